from django.apps import AppConfig


class IntegrationAgentsConfig(AppConfig):
    name = "tests.integration.agents_app"
    label = "integration_agents"
    verbose_name = "Integration test agents"
