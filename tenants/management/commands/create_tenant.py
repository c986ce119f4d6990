from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from agents import agent_names
from tenants.models import Tenant, TenantAgent


def parse_agents(value: str) -> list[str]:
    """`--agents a,b` -> ["a", "b"]; each must be defined in code, like in the admin."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(agent_names()))
    if unknown:
        raise CommandError(
            f"no agent named {', '.join(map(repr, unknown))}; defined: {', '.join(agent_names())}"
        )
    return list(dict.fromkeys(names))


class Command(BaseCommand):
    help = "Create a tenant if it does not exist (idempotent). Prints nothing secret."

    def add_arguments(self, parser):  # type: ignore[no-untyped-def]
        parser.add_argument("slug")
        parser.add_argument("--name", default="")
        parser.add_argument(
            "--agents",
            default=None,
            metavar="A,B",
            help="allow only these agents (comma-separated) instead of every agent in code; "
            "like --name, applied only when the tenant is created",
        )

    def handle(self, *args, slug: str, name: str, agents: str | None, **options) -> None:  # type: ignore[no-untyped-def]
        tenant = Tenant(slug=slug, name=name)
        try:
            tenant.full_clean(validate_unique=False)
        except Exception as error:  # noqa: BLE001 - ValidationError's message is the answer
            raise CommandError(f"invalid tenant slug {slug!r}: {error}") from None
        allowed = parse_agents(agents) if agents is not None else None
        with transaction.atomic():
            tenant, created = Tenant.objects.get_or_create(
                slug=slug, defaults={"name": name, "all_agents": allowed is None}
            )
            if created and allowed is not None:
                TenantAgent.objects.bulk_create(
                    TenantAgent(tenant=tenant, agent=agent) for agent in allowed
                )
        self.stdout.write(f"tenant {tenant.slug} {'created' if created else 'already exists'}")
