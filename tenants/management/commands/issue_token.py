from django.core.management.base import BaseCommand, CommandError

from tenants.models import Tenant
from tenants.tokens import issue_token


class Command(BaseCommand):
    help = "Print one client token (a JWT signed with the tenant's secret), alone on stdout."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("slug")
        parser.add_argument("client_id")
        parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
        parser.add_argument(
            "--allow",
            action="append",
            default=[],
            metavar="PATTERN",
            help="glob of streams the client may use (repeatable); default all",
        )
        parser.add_argument("--name", default=None, help="display name shown in presence")

    def handle(
        self, *args, slug: str, client_id: str, ttl: int, allow: list[str], name, **options
    ) -> None:  # type: ignore[no-untyped-def]
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"no tenant {slug!r}; create it with create_tenant")
        if ttl <= 0:
            raise CommandError("--ttl must be positive")
        if not client_id or len(client_id) > 200:
            raise CommandError("client id must be 1 to 200 characters")
        self.stdout.write(
            issue_token(tenant.signing_secret, slug, client_id, ttl, allow or None, name)
        )
