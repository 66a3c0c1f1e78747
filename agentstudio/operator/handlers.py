"""Kopf handlers: small functions that keep indexes of our resources and hand namespaces to the
reconciler. The reconciler, the Kubernetes client and the NATS bucket are set up by `operator.main`
before kopf starts and reached through `memo`."""

from __future__ import annotations

import logging
import random
from typing import Any

import kopf

from agentstudio.operator import credentials
from agentstudio.operator.kube import Kube
from agentstudio.operator.reconciler import IndexesNotReady, Reconciler
from agentstudio.resources import GROUP, VERSION, ApiKeySpec, WebhookSubscriptionSpec

log = logging.getLogger("agentstudio.operator")

AGENTS = (GROUP, VERSION, "agents")
WORKFLOWS = (GROUP, VERSION, "workflows")
APIKEYS = (GROUP, VERSION, "apikeys")
SUBSCRIPTIONS = (GROUP, VERSION, "webhooksubscriptions")
POLICIES = (GROUP, VERSION, "callpolicies")
ALL = (AGENTS, WORKFLOWS, APIKEYS, SUBSCRIPTIONS, POLICIES)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress and diff bases go to annotations: status belongs to our conditions.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="agentstudio.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="agentstudio.io")
    # Replicas peer; the one with the highest priority works, the others stand by.
    settings.peering.priority = random.randint(1, 1_000_000)
    settings.peering.stealth = True
    # Events are ours (with reasons people can act on); kopf's own would repeat them.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    # A tenant's operator serves named namespaces with resources that exist at start (the chart
    # installs the CRDs first): no cluster-wide list/watch of namespaces and CRDs, so no ClusterRole.
    settings.scanning.disabled = True


# --- Indexes: every object of our kinds, by namespace. Kopf fills them before any handler runs,
# so a compile never sees a half-listed namespace.


def _keep(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": dict(body.metadata),
            "spec": dict(body.spec), "status": dict(body.status)}


@kopf.index(*AGENTS)
def agents_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {namespace: _keep(body)}


@kopf.index(*WORKFLOWS)
def workflows_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {namespace: _keep(body)}


@kopf.index(*APIKEYS)
def apikeys_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {namespace: _keep(body)}


@kopf.index(*SUBSCRIPTIONS)
def subscriptions_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {namespace: _keep(body)}


@kopf.index(*POLICIES)
def policies_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
    return {namespace: _keep(body)}


def resources_of(indexes: dict[str, kopf.Index[str, dict[str, Any]]], namespace: str) -> list[dict[str, Any]]:
    if not indexes:  # no handler has run yet: kopf is still listing; an empty answer would be a lie
        raise IndexesNotReady(namespace)
    return [body for index in indexes.values() for body in index.get(namespace, [])]


# --- Changes: any change of spec (create, update, resume after a restart, delete) recompiles the
# namespace. Status-only changes (our own writes) are ignored.


INDEXES = ("agents_by_namespace", "workflows_by_namespace", "apikeys_by_namespace", "subscriptions_by_namespace",
           "policies_by_namespace")


def _reconciler(memo: kopf.Memo, kwargs: dict[str, Any]) -> Reconciler:
    # Each object gets a shallow copy of the memo: share the (live) indexes through a mutable value.
    memo.indexes.update({k: kwargs[k] for k in INDEXES})
    return memo.reconciler  # type: ignore[no-any-return]


def _spec_changed(memo: kopf.Memo, type: str | None, body: kopf.Body) -> bool:
    seen: dict[str, int] = memo.setdefault("generations", {})
    key = f"{body.get('kind')}/{body.metadata.namespace}/{body.metadata.name}"
    if type == "DELETED":
        seen.pop(key, None)
        return True
    generation = body.metadata.get("generation", 0)
    changed = seen.get(key) != generation or bool(body.metadata.get("deletionTimestamp"))
    seen[key] = generation
    return changed


async def _on_change(type: str | None, body: kopf.Body, namespace: str, memo: kopf.Memo, **kwargs: Any) -> None:
    if _spec_changed(memo, type, body):
        _reconciler(memo, kwargs).schedule(namespace)


for _resource in (AGENTS, WORKFLOWS, POLICIES):
    kopf.on.event(*_resource)(_on_change)


@kopf.on.event(*APIKEYS)
@kopf.on.event(*SUBSCRIPTIONS)
async def on_credentialed_change(**kwargs: Any) -> None:
    await _on_change(**kwargs)


# --- Credentials: generated once into owned Secrets, never regenerated on resume.


@kopf.on.create(*APIKEYS)
@kopf.on.update(*APIKEYS, field="spec")
@kopf.on.resume(*APIKEYS)
async def apikey_secret(body: kopf.Body, spec: kopf.Spec, namespace: str, memo: kopf.Memo, **kwargs: Any) -> None:
    await credentials.ensure_api_key(memo.kube, _keep(body), ApiKeySpec.model_validate(dict(spec)))
    reconciler = _reconciler(memo, kwargs)
    reconciler.forget_key(namespace, body.metadata.name)  # generated or rotated just now
    reconciler.schedule(namespace)


def _keys_in_a_secret_that_can_change(spec: kopf.Spec, **_: Any) -> bool:
    return bool(spec.get("secretRef") or spec.get("rotation"))


@kopf.timer(*APIKEYS, interval=30, initial_delay=30, when=_keys_in_a_secret_that_can_change)
async def recheck_keys(name: str, namespace: str, memo: kopf.Memo, **kwargs: Any) -> None:
    """A GitOps-managed Secret can change under us, and a rotated-out key expires: look again.
    An unchanged namespace compiles to the same digest and publishes nothing."""
    reconciler = _reconciler(memo, kwargs)
    reconciler.forget_key(namespace, name)
    reconciler.schedule(namespace)


@kopf.on.create(*SUBSCRIPTIONS)
@kopf.on.update(*SUBSCRIPTIONS, field="spec")
@kopf.on.resume(*SUBSCRIPTIONS)
async def webhook_secret(body: kopf.Body, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    await credentials.ensure_webhook_secret(memo.kube, _keep(body), WebhookSubscriptionSpec.model_validate(dict(spec)))


def install(memo: kopf.Memo, kube: Kube, reconciler: Reconciler) -> None:
    memo.kube = kube
    memo.reconciler = reconciler
    memo.indexes = {}
