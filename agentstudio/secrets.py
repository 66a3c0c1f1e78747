"""Reading values out of Kubernetes Secrets by reference (SecretKeyRef), the one way: webhook signing
secrets, the LLM's API key, api_call headers. Values are never logged, nor quoted in an error."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time
from typing import Protocol

from agentstudio.http_failures import header_problem
from agentstudio.resources import SecretKeyRef

log = logging.getLogger("agentstudio.secrets")


class SecretReader(Protocol):
    async def get(self, tenant: str, ref: SecretKeyRef) -> str | None:
        """The value of `ref` in the tenant's namespace, or None when it cannot be read."""


class StaticSecrets:
    """Secrets known up front (`agent-studio dev`, tests), keyed (tenant, Secret name, key)."""

    def __init__(self, secrets: dict[tuple[str, str, str], str] | None = None) -> None:
        self.secrets = secrets or {}

    async def get(self, tenant: str, ref: SecretKeyRef) -> str | None:
        return self.secrets.get((tenant, ref.name, ref.key))


class SecretInvalid(Exception):
    """A Secret's value cannot be used where it is referenced; str() names the Secret, the key and
    why, never the value."""


def header_value(ref: SecretKeyRef, value: str) -> str:
    """`value` as an HTTP header value. One trailing line break (LF or CRLF) is dropped, since
    `kubectl create secret --from-file` keeps a file's last one; anything else a header cannot carry
    (a line break inside, NUL, a control or non-ASCII character) raises SecretInvalid."""
    if value.endswith("\n"):
        value = value[:-2] if value.endswith("\r\n") else value[:-1]
    problem = header_problem(value)
    if problem is not None:
        raise SecretInvalid(f"secret {ref.name}/{ref.key} cannot be sent as an HTTP header: {problem}")
    return value


async def read_header(secrets: SecretReader, tenant: str, ref: SecretKeyRef) -> str | None:
    """The value of `ref` ready for an HTTP header (see header_value), or None when it cannot be read."""
    value = await secrets.get(tenant, ref)
    return None if value is None else header_value(ref, value)


def env_name(ref: SecretKeyRef) -> str:
    """AGENTSTUDIO_SECRET_<NAME>_<KEY>, upper case, anything else than letters and digits as _."""
    return "AGENTSTUDIO_SECRET_" + re.sub(r"[^A-Z0-9]", "_", f"{ref.name}_{ref.key}".upper())


class EnvSecrets:
    """`agent-studio dev`: a Secret's value comes from the environment (see env_name), so a local run
    needs no Secret written to disk."""

    async def get(self, tenant: str, ref: SecretKeyRef) -> str | None:
        return os.environ.get(env_name(ref))


class KubeSecrets:
    """Reads Secrets through the Kubernetes API (in cluster), cached briefly."""

    def __init__(self, ttl_seconds: float = 30.0) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._core = client.CoreV1Api()
        self._ttl = ttl_seconds
        self._cache: dict[tuple[str, str, str], tuple[float, str | None]] = {}

    async def get(self, tenant: str, ref: SecretKeyRef) -> str | None:
        from kubernetes.client.exceptions import ApiException

        key = (tenant, ref.name, ref.key)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        try:
            secret = await asyncio.to_thread(self._core.read_namespaced_secret, ref.name, tenant)
            raw = (secret.data or {}).get(ref.key)
            value = base64.b64decode(raw).decode() if raw else None
        except ApiException as exc:
            log.warning("secret not readable", extra={"tenant": tenant, "secret": ref.name, "status": exc.status})
            value = None
        self._cache[key] = (time.monotonic(), value)
        return value
