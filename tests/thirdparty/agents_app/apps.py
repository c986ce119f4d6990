from django.apps import AppConfig


class ThirdPartyAgentsConfig(AppConfig):
    name = "tests.thirdparty.agents_app"
    label = "thirdparty_agents"
    verbose_name = "Third-party server check agents"
