from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        # Agents are defined in apps' agents.py modules, as Celery finds tasks.py: every
        # process (gateway, worker, beat) imports them at start, so each knows them all.
        autodiscover_modules("agents")

        from agents import subscribers
        from streams import subscriptions

        # The streams' writers ask whether an event starts agents (streams/subscriptions.py)
        # without importing the registry: it is handed to them here.
        subscriptions.answer_with(
            lambda kind, agent, stream, status: bool(subscribers(kind, agent, stream, status))
        )
