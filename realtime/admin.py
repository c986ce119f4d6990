from django.contrib import admin

from realtime.models import Tenant


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "enabled", "max_frame_bytes", "stream_retention", "updated_at")
    list_filter = ("enabled",)
    search_fields = ("slug", "name")
    readonly_fields = ("created_at", "updated_at")
