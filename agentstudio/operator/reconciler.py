"""One namespace at a time: compile its resources into a bundle, publish it, and report on each resource.

A burst of changes is debounced into one compile. A namespace is all or nothing: while any resource
has errors, nothing is published and the last good bundle stays in force; the broken resources get
Ready=False with the reason and a Warning Event, and the others say whether their current generation
is live. Compile warnings never block: they follow the Ready message, with a Warning Event when they change.

Conditions follow kstatus (sigs.k8s.io/cli-utils pkg/kstatus), which Flux's health checks apply:
`Reconciling=True` while a new generation is being compiled, `Stalled=True` (with Ready's reason)
while it cannot go live without a change to a manifest; both are removed when they stop being true.
Status is written only where it changes: a publish writes the objects whose generation it made live
and the namespace's summary (the ConfigMap `agent-studio-bundle`), not every object in the namespace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


from agentstudio import bundle_store
from agentstudio.bundle import Bundle, KeyMaterial, compile_bundle
from agentstudio.manifests import Located, Problem, Rejected, parse, rejected
from agentstudio.operator import credentials
from agentstudio.operator.kube import Kube
from agentstudio.operator.metrics import OperatorMetrics
from agentstudio.resources import KINDS, ApiKey, ApiKeySpec, WebhookSubscriptionSpec, webhook_secret_ref

log = logging.getLogger("agentstudio.operator")

# kind → plural, for status patches
PLURALS = {kind: model.PLURAL for kind, model in KINDS.items()}

# Separates the Ready message from the compile warnings appended to it; the old status is the only
# record of which warnings a user has already been told about, so it survives restarts.
WARNINGS = "; warnings: "

# kstatus' "abnormal-true" condition types: present only while True.
RECONCILING, STALLED = "Reconciling", "Stalled"

# The namespace-level summary of what is in force: version, digest and size of the live bundle.
SUMMARY = "agent-studio-bundle"


class IndexesNotReady(Exception):
    """The operator has not finished listing its resources; compiling now would publish too little."""


def ref(body: dict[str, Any]) -> str:
    return f"{body['kind']}/{body['metadata']['name']}"


@dataclass
class _Namespace:
    dirty: bool = False
    task: asyncio.Task[None] | None = None
    published: dict[str, int] = field(default_factory=dict)  # ref → generation in the live bundle
    version: int | None = None
    summary: dict[str, str] | None = None  # what the summary ConfigMap says


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        kv: bundle_store.Buckets,
        resources_of: Callable[[str], Iterable[dict[str, Any]]],
        debounce_seconds: float = 0.1,
        max_concurrent_calls: int | None = None,
        calls_per_second: float | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self._kube = kube
        self._metrics = metrics
        self._max_concurrent_calls = max_concurrent_calls  # the release's plan, into every bundle
        self._calls_per_second = calls_per_second  # and its pace
        self._kv = kv
        self._resources_of = resources_of
        self._debounce = debounce_seconds
        self._namespaces: dict[str, _Namespace] = {}
        # (namespace, subscription) → the URL whose receiver answered 410 Gone (fed by watch_gone)
        self.gone: dict[tuple[str, str], str] = {}
        # (namespace, ApiKey) → ((uid, generation), what its Secret held). Reading every key's Secret
        # on every compile made one prompt change cost one GET per ApiKey (~6 s at 1,000 keys). A
        # Secret changes under a key through our handlers and, for secretRef and rotation, the
        # recheck timer: each calls forget_key.
        self._keys: dict[tuple[str, str], tuple[tuple[str | None, int | None], credentials.KeyState]] = {}
        self._key_epochs: dict[tuple[str, str], int] = {}
        self._stopped = False

    def stop(self) -> None:
        """Shutting down: cancel what runs (a compile retrying against an API server that is gone
        would hold the exit) and start nothing more."""
        self._stopped = True
        for state in self._namespaces.values():
            if state.task is not None:
                state.task.cancel()

    def forget_key(self, namespace: str, name: str) -> None:
        """The Secret behind ApiKey `name` may have changed: read it on the next compile."""
        key = (namespace, name)
        self._keys.pop(key, None)
        self._key_epochs[key] = self._key_epochs.get(key, 0) + 1  # a read under way is stale too

    async def _key_state(self, body: dict[str, Any], spec: ApiKeySpec) -> credentials.KeyState:
        meta = body["metadata"]
        key, stamp = (meta["namespace"], meta["name"]), (meta.get("uid"), meta.get("generation"))
        cached = self._keys.get(key)
        if cached is not None and cached[0] == stamp and (
            cached[1].previous_valid_until is None or cached[1].previous_valid_until > datetime.now(timezone.utc)
        ):
            return cached[1]
        epoch = self._key_epochs.get(key, 0)
        state = await credentials.key_state(self._kube, body, spec)
        if state.problem is None and state.pending is None and self._key_epochs.get(key, 0) == epoch:
            self._keys[key] = (stamp, state)  # problems and pending keys are read again each time
        else:
            self._keys.pop(key, None)
        return state

    def schedule(self, namespace: str) -> None:
        """Compile `namespace` soon; calls during a burst or a running compile fold into one more run."""
        if self._stopped:
            return
        state = self._namespaces.setdefault(namespace, _Namespace())
        state.dirty = True
        if state.task is None or state.task.done():
            state.task = asyncio.create_task(self._run(namespace, state), name=f"reconcile-{namespace}")

    async def _run(self, namespace: str, state: _Namespace) -> None:
        delay = self._debounce
        if self._metrics is not None:
            self._metrics.reconcile_errors.labels(namespace)  # at 0: increase() sees the first error
        while state.dirty:
            await asyncio.sleep(delay)
            state.dirty = False
            if self._metrics is not None:
                self._metrics.reconciles.labels(namespace).inc()
            try:
                await self.reconcile(namespace, state)
                delay = self._debounce
            except IndexesNotReady:
                state.dirty = True
                delay = 0.5
            except Exception:  # noqa: BLE001 - retried: NATS or the API server may be back soon
                log.exception("reconcile failed; retrying", extra={"tenant": namespace})
                if self._metrics is not None:
                    self._metrics.reconcile_errors.labels(namespace).inc()
                state.dirty = True
                delay = min(max(delay * 2, 1.0), 30.0)

    async def reconcile(self, namespace: str, state: _Namespace) -> None:
        # No resources left compiles to an empty bundle: the tenant stays known (its keys are gone,
        # so every request gets 401) and ingest stays ready.
        bodies = [b for b in self._resources_of(namespace) if not b["metadata"].get("deletionTimestamp")]
        # Says Reconciling on the objects with an unreported generation while the compile runs.
        marking = asyncio.create_task(self._mark_reconciling(bodies))
        try:
            await self._compile(namespace, state, bodies, marking)
        finally:
            if not marking.done():
                marking.cancel()
            await asyncio.gather(marking, return_exceptions=True)

    async def _compile(
        self, namespace: str, state: _Namespace, bodies: list[dict[str, Any]], marking: asyncio.Task[None]
    ) -> None:
        located: list[Located] = []
        refused: list[Rejected] = []  # what the CRD schema let through and our models did not
        problems: list[Problem] = []
        for body in bodies:
            item, parse_problems = parse(_essence(body), ref(body), None)
            problems += parse_problems
            if item is not None:
                located.append(item)
            elif (refusal := rejected(_essence(body), ref(body), None, parse_problems)) is not None:
                refused.append(refusal)
        key_states: dict[str, credentials.KeyState] = {}
        for item in located:
            if isinstance(item.resource, ApiKey):
                key_states[item.resource.name] = state_ = await self._key_state(
                    _body_of(bodies, item.source), item.resource.spec
                )
                if state_.problem is not None:
                    reason, message = state_.problem
                    problems.append(Problem(item.source, "spec.secretRef", message, None, reason))
        for gone in [k for k in self._keys if k[0] == namespace and k[1] not in key_states]:
            del self._keys[gone]
        material: dict[str, list[KeyMaterial]] = {n: s.material for n, s in key_states.items()}
        result = compile_bundle(namespace, located, material, rejected=refused,
                                max_concurrent_calls=self._max_concurrent_calls,
                                calls_per_second=self._calls_per_second)
        problems += result.errors
        by_ref: dict[str, list[Problem]] = {}
        for problem in problems:
            by_ref.setdefault(problem.source, []).append(problem)
        warned: dict[str, list[Problem]] = {}
        for problem in result.warnings:
            warned.setdefault(problem.source, []).append(problem)

        if not problems and result.bundle is not None:
            published = await bundle_store.publish(self._kv, result.bundle)
            state.version = published.version
            state.published = {ref(b): b["metadata"].get("generation", 0) for b in bodies}
            log.info("bundle published", extra={"tenant": namespace, "version": published.version})
            await self._summarise(namespace, state, published)
        else:
            log.warning(
                "bundle not published: resources have errors",
                extra={"tenant": namespace, "errors": sorted(by_ref)},
            )
        await marking  # our final word on an object must come after "Reconciling"
        for body in bodies:
            own = by_ref.get(ref(body), [])
            await self._report(body, own, warned.get(ref(body), []), sorted(by_ref), state, key_states)

    async def _mark_reconciling(self, bodies: list[dict[str, Any]]) -> None:
        for body in bodies:
            generation = body["metadata"].get("generation", 0)
            old = body.get("status") or {}
            if old.get("observedGeneration") == generation:
                continue  # reported on already: a compile of someone else's change
            previous = _find(old, RECONCILING)
            if previous and previous.get("status") == "True" and previous.get("observedGeneration") == generation:
                continue  # marked by an earlier attempt
            ready = _find(old, "Ready") or _condition(old, "Ready", "Unknown", "Compiling", "", generation)
            marked = [ready, _condition(old, RECONCILING, "True", "Compiling", f"compiling generation {generation}",
                                        generation)]
            meta = body["metadata"]
            await self._kube.patch_status(PLURALS[body["kind"]], meta["namespace"], meta["name"], {"conditions": marked})

    async def _summarise(self, namespace: str, state: _Namespace, published: Bundle) -> None:
        summary = {
            "version": str(published.version),
            "digest": published.digest,
            "agents": str(len(published.agents)),
            "workflows": str(len(published.workflows)),
            "apiKeys": str(len(published.keys)),
            "webhookSubscriptions": str(len(published.subscriptions)),
        }
        if summary != state.summary:
            await self._kube.apply_config_map(namespace, SUMMARY, summary)
            state.summary = summary

    def _gone(self, body: dict[str, Any]) -> tuple[str, str] | None:
        if body["kind"] != "WebhookSubscription":
            return None
        url = self.gone.get((body["metadata"]["namespace"], body["metadata"]["name"]))
        if url is None or url != (body.get("spec") or {}).get("url"):
            return None
        return "ReceiverGone", f"{url} answered 410 Gone: deliveries stopped; change spec.url to deliver again"

    async def _report(
        self,
        body: dict[str, Any],
        own: list[Problem],
        warnings: list[Problem],
        broken: list[str],
        state: _Namespace,
        key_states: dict[str, credentials.KeyState],
    ) -> None:
        generation = body["metadata"].get("generation", 0)
        pending = key_states[body["metadata"]["name"]].pending if body["kind"] == "ApiKey" and \
            body["metadata"]["name"] in key_states else None
        warning = self._gone(body)
        old = body.get("status") or {}
        old_ready, old_reason, old_message = _ready_of(old)
        old_message, _, old_notes = (old_message or "").partition(WARNINGS)
        live = _find(old, "Ready") or {}
        reported_live = (old_ready, old_reason, live.get("observedGeneration")) == ("True", "Published", generation)
        stalled = True
        if own:
            ready, reason = "False", own[0].reason
            message = _lines(own)
        elif pending is not None:
            ready, (reason, message) = "False", pending
            stalled = False
        elif warning is not None:
            ready, (reason, message) = "False", warning
        elif state.published.get(ref(body)) == generation or (not state.published and reported_live):
            # (Before this process's first publish, the status it finds is the record of what is live.)
            ready, reason, stalled = "True", "Published", False
            # Said once, when this generation went live: a later publish of others' changes rewrites nothing.
            message = old_message if reported_live else f"live since bundle version {state.version}"
        else:
            ready, reason = "False", "Blocked"
            message = f"not published: {', '.join(broken)} in this namespace has errors"
        notes = _lines(warnings)
        conditions = [_condition(old, "Ready", ready, reason, message + (WARNINGS + notes if notes else ""), generation)]
        if pending is not None:
            conditions.append(_condition(old, RECONCILING, "True", reason, message, generation))
        if stalled:
            conditions.append(_condition(old, STALLED, "True", reason, message, generation))
        status: dict[str, Any] = {"observedGeneration": generation, "conditions": conditions}
        status.update(_kind_status(body, key_states))
        if all(old.get(k) == v for k, v in status.items()):
            return
        await self._kube.patch_status(PLURALS[body["kind"]], body["metadata"]["namespace"], body["metadata"]["name"], status)
        if ready == "False" and pending is None and (old_ready, old_reason, old_message) != (ready, reason, message):
            await self._kube.event(body, "Warning", reason, message)
        elif ready == "True" and old_ready != "True":
            await self._kube.event(body, "Normal", reason, message)
        if notes and notes != old_notes:  # once per new set of warnings, not on every compile
            await self._kube.event(body, "Warning", warnings[0].reason, notes)


def _essence(body: dict[str, Any]) -> dict[str, Any]:
    """What the models read: the status is ours and is not an input."""
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}


def _body_of(bodies: list[dict[str, Any]], source: str) -> dict[str, Any]:
    return next(b for b in bodies if ref(b) == source)


def _lines(problems: list[Problem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)


def _find(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)


def _ready_of(status: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    ready = _find(status, "Ready") or {}
    return ready.get("status"), ready.get("reason"), ready.get("message")


def _condition(old: dict[str, Any], type_: str, value: str, reason: str, message: str, generation: int) -> dict[str, Any]:
    previous = _find(old, type_)
    changed = previous is None or previous.get("status") != value
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": (
            datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if changed else previous["lastTransitionTime"]
        ),
    }


def _kind_status(body: dict[str, Any], key_states: dict[str, credentials.KeyState]) -> dict[str, Any]:
    kind, spec, name = body["kind"], body.get("spec") or {}, body["metadata"]["name"]
    if kind in ("Agent", "Workflow"):
        return {"slug": spec.get("slug") or name}
    if kind == "ApiKey":
        ks = key_states.get(name)
        out: dict[str, Any] = {
            "scopes": spec.get("scopes", []),
            "mode": spec.get("mode", "live"),
        }
        if ks is not None:
            out.update({"keyHint": ks.hint, "secretName": ks.secret_name, "createdAt": ks.created_at})
            out["previousKeyValidUntil"] = (
                ks.previous_valid_until.strftime("%Y-%m-%dT%H:%M:%SZ") if ks.previous_valid_until else None
            )
        return out
    if kind == "WebhookSubscription":
        return {"secretName": webhook_secret_ref(name, WebhookSubscriptionSpec.model_validate(spec)).name}
    return {}
