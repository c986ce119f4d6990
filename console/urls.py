"""The console's URLs outside the admin's own: the tenants' admin pages were under
/admin/realtime/ while the Tenant model lived in the gateway's app; those addresses (an
operator's bookmarks, links in runbooks) now lead to the same pages under /admin/tenants/."""

from __future__ import annotations

from django.urls import URLPattern, re_path
from django.views.generic.base import RedirectView

urlpatterns: list[URLPattern] = [
    re_path(
        r"^admin/realtime/(?P<rest>tenant(?:agent)?/.*)$",
        RedirectView.as_view(url="/admin/tenants/%(rest)s", query_string=True),
        name="tenants-moved",
    ),
]
