from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "workers"

    def ready(self) -> None:

        from project.conf import conf
        from streams.rate_limits import parse_limits

        # A malformed SWITCHBOARD_BACKEND_LIMITS stops every process at start, rather than
        # failing each model call of the backend it meant to limit.
        parse_limits(conf().backend_limits)
