"""Key material in Secrets: API keys (generated, referenced, rotated) and webhook signing secrets.

A generated API key lives in the Secret `<apikey>-api-key` (data `key`), owned by its ApiKey. On
rotation the old key moves to `previous-key` and stays valid until the annotated instant. Only
digests and hints leave this module; plaintext goes nowhere but the Secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from agentstudio import keys, signing
from agentstudio.bundle import KeyMaterial
from agentstudio.operator.kube import Kube, secret_value
from agentstudio.resources import WEBHOOK_SECRET_KEY, ApiKeySpec, WebhookSubscriptionSpec, webhook_secret_ref

CURRENT = "key"
PREVIOUS = "previous-key"
PREVIOUS_NOT_AFTER = "agentstudio.io/previous-key-not-after"
ROTATION_ID = "agentstudio.io/rotation-id"
WEBHOOK_SECRET = WEBHOOK_SECRET_KEY


def api_key_secret_name(apikey: str) -> str:
    return f"{apikey}-api-key"


@dataclass
class KeyState:
    """What the operator knows of one ApiKey's keys, safe to show and to compile."""

    material: list[KeyMaterial] = field(default_factory=list)
    hint: str | None = None
    secret_name: str | None = None
    created_at: str | None = None
    previous_valid_until: datetime | None = None
    problem: tuple[str, str] | None = None  # (reason, message): the namespace cannot be published
    pending: tuple[str, str] | None = None  # (reason, message): not ready yet, nothing is wrong


async def ensure_api_key(kube: Kube, body: dict[str, Any], spec: ApiKeySpec) -> None:
    """Generate the key on first sight, and a new one when spec.rotation.id changes."""
    if spec.secret_ref is not None:
        return
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    secret_name = api_key_secret_name(name)
    rotation_id = spec.rotation.id if spec.rotation else ""
    secret = await kube.read_secret(namespace, secret_name)
    if secret is None:
        await kube.create_secret(
            namespace, secret_name, {CURRENT: keys.generate(spec.mode)}, body, {ROTATION_ID: rotation_id}
        )
        return
    if (secret.metadata.annotations or {}).get(ROTATION_ID, "") == rotation_id:
        return
    old = secret_value(secret, CURRENT)
    grace = spec.rotation.grace_period_seconds if spec.rotation else 0
    not_after = datetime.now(timezone.utc) + timedelta(seconds=grace)
    data = {CURRENT: keys.generate(spec.mode)}
    if old:
        data[PREVIOUS] = old
    await kube.replace_secret_data(
        secret, data, {ROTATION_ID: rotation_id, PREVIOUS_NOT_AFTER: not_after.isoformat()}
    )


async def key_state(kube: Kube, body: dict[str, Any], spec: ApiKeySpec) -> KeyState:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    secret_name, data_key = (
        (spec.secret_ref.name, spec.secret_ref.key) if spec.secret_ref else (api_key_secret_name(name), CURRENT)
    )
    secret = await kube.read_secret(namespace, secret_name)
    if secret is None and spec.secret_ref is None:
        # Just created: the create handler is writing it and will schedule another compile.
        return KeyState(secret_name=secret_name, pending=("KeyPending", f"generating the key into Secret {secret_name}"))
    if secret is None:
        return KeyState(secret_name=secret_name, problem=("SecretNotFound", f"Secret {secret_name} not found"))
    current = secret_value(secret, data_key)
    if current is None or not keys.is_well_formed(current.strip()):
        return KeyState(
            secret_name=secret_name,
            problem=("InvalidKey", f"Secret {secret_name} has no well-formed key under {data_key!r}"),
        )
    current = current.strip()
    created = secret.metadata.creation_timestamp
    state = KeyState(
        material=[KeyMaterial(keys.digest(current), hint=keys.hint(current), created_at=created)],
        hint=keys.hint(current),
        secret_name=secret_name,
        created_at=created.isoformat() if created else None,
    )
    previous = secret_value(secret, PREVIOUS) if spec.secret_ref is None else None
    until = (secret.metadata.annotations or {}).get(PREVIOUS_NOT_AFTER)
    if previous and until:
        not_after = datetime.fromisoformat(until)
        if not_after > datetime.now(timezone.utc):
            state.material.append(KeyMaterial(keys.digest(previous), not_after, hint=keys.hint(previous)))
            state.previous_valid_until = not_after
    return state


async def ensure_webhook_secret(kube: Kube, body: dict[str, Any], spec: WebhookSubscriptionSpec) -> str:
    """The name of the Secret holding the subscription's whsec_ signing secret (generated if needed)."""
    if spec.secret_ref is not None:
        return spec.secret_ref.name
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    secret_name = webhook_secret_ref(name, spec).name
    if await kube.read_secret(namespace, secret_name) is None:
        value = signing.new_secret()
        await kube.create_secret(namespace, secret_name, {WEBHOOK_SECRET: value}, body, {})
    return secret_name
