"""Tenant and TenantAgent now belong to the tenants app: removed from this app's state only.
Their tables stay as they are, under the tenants app's models (db_table), and so does every
row (see tenants/migrations/0001_initial.py)."""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('realtime', '0006_hardening'),
        ('tenants', '0001_initial'),
        # Nothing may point at realtime.Tenant any more when it leaves the state.
        ('history', '0002_tenant_moved'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.DeleteModel(name='TenantAgent'),
                migrations.DeleteModel(name='Tenant'),
            ],
        ),
    ]
