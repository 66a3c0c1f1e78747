"""The operator's own Kubernetes API calls (Secrets, status, Events, the bundle summary ConfigMap), through
the official client.

Kopf watches and dispatches; what the operator writes by itself goes through here, in a thread so the
event loop never blocks. Secret *values* never leave these functions except as return values.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime, timezone
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from agentstudio.resources import GROUP, VERSION

MANAGED_BY = {"app.kubernetes.io/managed-by": "agent-studio-operator", "app.kubernetes.io/part-of": "agent-studio"}


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            api_client = client.ApiClient()
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    async def read_secret(self, namespace: str, name: str) -> client.V1Secret | None:
        try:
            return await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create_secret(
        self, namespace: str, name: str, data: dict[str, str], owner: dict[str, Any], annotations: dict[str, str]
    ) -> client.V1Secret | None:
        """Create an owned Secret; None when it already exists (never overwrite a key)."""
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels=MANAGED_BY,
                annotations=annotations,
                owner_references=[owner_reference(owner)],
            ),
            type="Opaque",
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        )
        try:
            return await asyncio.to_thread(self.core.create_namespaced_secret, namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    async def replace_secret_data(
        self, secret: client.V1Secret, data: dict[str, str], annotations: dict[str, str]
    ) -> client.V1Secret:
        """Update with the resourceVersion read, so a concurrent writer makes this fail (409)."""
        secret.data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        secret.metadata.annotations = {**(secret.metadata.annotations or {}), **annotations}
        return await asyncio.to_thread(
            self.core.replace_namespaced_secret, secret.metadata.name, secret.metadata.namespace, secret
        )

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(
                self.custom.patch_namespaced_custom_object_status,
                GROUP, VERSION, namespace, plural, name, {"status": status},
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    async def apply_config_map(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Set an operator-owned ConfigMap's data, creating it the first time."""
        try:
            await asyncio.to_thread(self.core.patch_namespaced_config_map, name, namespace, {"data": data})
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, labels=MANAGED_BY), data=data)
            await asyncio.to_thread(self.core.create_namespaced_config_map, namespace, body)

    async def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        now = datetime.now(timezone.utc)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=body["apiVersion"],
                kind=body["kind"],
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            source=client.V1EventSource(component="agent-studio-operator"),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        await asyncio.to_thread(self.core.create_namespaced_event, meta["namespace"], event)


def owner_reference(owner: dict[str, Any]) -> client.V1OwnerReference:
    return client.V1OwnerReference(
        api_version=owner["apiVersion"],
        kind=owner["kind"],
        name=owner["metadata"]["name"],
        uid=owner["metadata"]["uid"],
        controller=True,
        block_owner_deletion=True,
    )


def secret_value(secret: client.V1Secret, key: str) -> str | None:
    raw = (secret.data or {}).get(key)
    return base64.b64decode(raw).decode() if raw is not None else None
