"""Tenant and TenantAgent move here from the gateway's app (realtime) without moving data.

The tables keep their names (db_table: realtime_tenant, realtime_tenantagent), so this
migration creates the models in Django's state only; realtime's 0007 removes them from its
own state, after history's 0002 has pointed HistoryEntry's foreign key here. On a database
migrated before the move nothing is written but the content types, renamed so that the
admin permissions granted on tenants keep working (contenttypes would otherwise create new
ones and leave the old, with their grants, unused).
"""

import django.core.validators
import django.db.models.deletion
import tenants.models
from django.db import migrations, models


MOVED_MODELS = ("tenant", "tenantagent")


def _rename_content_types(old_label: str, new_label: str):
    def rename(apps, schema_editor):
        ContentType = apps.get_model("contenttypes", "ContentType")
        db = schema_editor.connection.alias
        for model in MOVED_MODELS:
            if ContentType.objects.using(db).filter(app_label=new_label, model=model).exists():
                continue
            ContentType.objects.using(db).filter(app_label=old_label, model=model).update(
                app_label=new_label
            )

    return rename


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        # The tables this state describes: created by realtime's migrations up to 0006.
        ('realtime', '0006_hardening'),
        ('contenttypes', '0002_remove_content_type_name'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name='Tenant',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('slug', models.CharField(max_length=63, unique=True, validators=[django.core.validators.RegexValidator('\\A[a-z0-9][a-z0-9_-]{0,62}\\Z', 'lowercase letters, digits, - and _')])),
                        ('name', models.CharField(blank=True, max_length=200)),
                        ('signing_secret', models.CharField(default=tenants.models.new_signing_secret, max_length=200)),
                        ('previous_signing_secret', models.CharField(blank=True, editable=False, max_length=200)),
                        ('secret_rotated_at', models.DateTimeField(blank=True, editable=False, null=True)),
                        ('enabled', models.BooleanField(default=True)),
                        ('max_frame_bytes', models.PositiveIntegerField(default=65536, help_text='Largest client frame accepted; larger ones get too_large.')),
                        ('stream_retention', models.PositiveIntegerField(default=10000, help_text='Events kept per stream for resume; older ones answer history_expired.')),
                        ('max_connections', models.PositiveIntegerField(default=20000, help_text='Open WebSocket connections for the whole tenant; past it, close 4029.')),
                        ('max_connections_per_client', models.PositiveIntegerField(default=20, help_text='Open connections of one client id; past it, close 4029.')),
                        ('max_runs_in_flight_per_connection', models.PositiveIntegerField(default=8, help_text='Runs a connection may have unfinished; past it, send answers rate_limited.')),
                        ('max_queued_runs', models.PositiveIntegerField(default=2000, help_text='Runs of the tenant waiting for a worker; past it, send answers overloaded.')),
                        ('client_messages_per_s', models.PositiveIntegerField(default=20, help_text='Sustained send/publish rate of one client (token bucket, all gateways).')),
                        ('client_burst', models.PositiveIntegerField(default=40, help_text='Messages one client may send at once above its rate.')),
                        ('tenant_messages_per_s', models.PositiveIntegerField(default=2000, help_text='Sustained send/publish rate of the whole tenant (all gateways).')),
                        ('tenant_burst', models.PositiveIntegerField(default=4000, help_text='Messages the tenant may send at once above its rate.')),
                        ('client_receipts_per_s', models.PositiveIntegerField(default=100, help_text="Sustained receipt rate of one client (a bucket apart from its messages').")),
                        ('client_receipt_burst', models.PositiveIntegerField(default=200, help_text='Receipts one client may send at once above that rate.')),
                        ('max_subscriptions_per_connection', models.PositiveIntegerField(default=1000, help_text='Streams one connection may be subscribed to at once (subscribe, and streams it sends to); past it, rate_limited until it unsubscribes.')),
                        ('max_token_lifetime_s', models.PositiveIntegerField(default=2592000, help_text='Longest a token may still be valid for: a later exp is refused (4001).')),
                        ('fault_injection', models.BooleanField(default=False, help_text="Honour the simulated backend's fault and delay options (fail, latency_ms, chunk_delay_ms) in this tenant's sends: for rehearsals only, as stalled runs hold workers every tenant shares. SWITCHBOARD_FAULT_INJECTION turns them on for all tenants.")),
                        ('weight', models.PositiveIntegerField(default=1, help_text='Share of worker time when tenants compete (fair scheduling).')),
                        ('all_agents', models.BooleanField(default=True, help_text='Allow every agent defined in code; untick to allow only the agents enabled below.')),
                        ('max_causal_depth', models.PositiveSmallIntegerField(default=3, help_text="How many agent runs may follow one another by subscription (a run caused by an event of a run caused by ...). A client's own message starts depth 0; a triggered run deeper than this is refused.")),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('updated_at', models.DateTimeField(auto_now=True)),
                    ],
                    options={
                        'db_table': 'realtime_tenant',
                        'ordering': ['slug'],
                    },
                ),
                migrations.CreateModel(
                    name='TenantAgent',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('agent', models.CharField(max_length=100)),
                        ('enabled', models.BooleanField(default=True)),
                        ('model', models.CharField(blank=True, help_text="Model name used instead of the one in the agent's code for this tenant's runs (model-calling steps other than the simulated backend).", max_length=200)),
                        ('api_key_env', models.CharField(blank=True, help_text="NAME of the environment variable holding this tenant's API key for the model provider. The key itself is never stored.", max_length=100, validators=[django.core.validators.RegexValidator('\\A[A-Z_][A-Z0-9_]*\\Z', 'an environment variable name: A-Z, 0-9 and _, not a key')])),
                        ('base_url', models.URLField(blank=True, help_text="OpenAI-compatible endpoint for this tenant's calls, instead of SWITCHBOARD_OPENAI_BASE_URL.")),
                        ('tenant', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='agent_grants', to='tenants.tenant')),
                    ],
                    options={
                        'verbose_name': 'agent grant',
                        'db_table': 'realtime_tenantagent',
                        'ordering': ['agent'],
                        'unique_together': {('tenant', 'agent')},
                    },
                ),
            ],
        ),
        migrations.RunPython(
            _rename_content_types('realtime', 'tenants'),
            _rename_content_types('tenants', 'realtime'),
        ),
    ]
