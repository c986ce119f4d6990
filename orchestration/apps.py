from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"

    def ready(self) -> None:
        from django.utils.module_loading import autodiscover_modules

        # Agents are defined in apps' agents.py modules, as Celery finds tasks.py: every
        # process (gateway, worker, beat) imports them at start, so each knows them all.
        autodiscover_modules("agents")
