from django.core.management.base import BaseCommand, CommandError

from realtime.models import Tenant


class Command(BaseCommand):
    help = "Create a tenant if it does not exist (idempotent). Prints nothing secret."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("slug")
        parser.add_argument("--name", default="")

    def handle(self, *args, slug: str, name: str, **options) -> None:  # type: ignore[no-untyped-def]
        tenant = Tenant(slug=slug, name=name)
        try:
            tenant.full_clean(validate_unique=False)
        except Exception as error:  # noqa: BLE001 - ValidationError's message is the answer
            raise CommandError(f"invalid tenant slug {slug!r}: {error}") from None
        tenant, created = Tenant.objects.get_or_create(slug=slug, defaults={"name": name})
        self.stdout.write(f"tenant {tenant.slug} {'created' if created else 'already exists'}")
