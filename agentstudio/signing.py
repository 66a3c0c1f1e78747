"""The one place that signs webhooks: Standard Webhooks (webhook-id, webhook-timestamp,
webhook-signature `v1,<base64 HMAC-SHA256>` over `id.timestamp.body` with a whsec_ secret), through
the `standardwebhooks` reference library, so receivers verify with that same package."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timezone

from standardwebhooks import Webhook


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def headers(secret: str, message_id: str, body: str, at: datetime | None = None) -> dict[str, str]:
    at = at or datetime.now(timezone.utc)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, at, body),
        "content-type": "application/json",
    }
