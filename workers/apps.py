from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"

    def ready(self) -> None:
        from django.conf import settings

        from streams.rate_limits import parse_limits

        # A malformed SWITCHBOARD_BACKEND_LIMITS stops every process at start, rather than
        # failing each model call of the backend it meant to limit.
        parse_limits(settings.SWITCHBOARD.get("BACKEND_LIMITS"))
