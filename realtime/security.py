"""Origin checks for browser WebSockets."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from channels.security.websocket import OriginValidator


class BrowserOriginValidator(OriginValidator):
    """Refuse a browser handshake from an origin not allowed; admit clients with no Origin.

    Only browsers send Origin, and only browsers can be tricked into connecting from
    another site; other clients prove who they are with their token alone.
    """

    def valid_origin(self, parsed_origin: Any) -> bool:
        if parsed_origin is None:
            return True
        return super().valid_origin(parsed_origin)

    def allows(self, scope: dict[str, Any]) -> bool:
        """The same check as the middleware, for an application that makes it itself."""
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                try:
                    return self.valid_origin(urlparse(value.decode("latin1")))
                except (UnicodeDecodeError, ValueError):
                    return False
        return True
