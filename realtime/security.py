"""Origin checks for browser WebSockets."""

from __future__ import annotations

from typing import Any

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
