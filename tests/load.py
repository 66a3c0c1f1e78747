"""A marketing platform's steady load on ingest: calls posted at a rate, each with its own
Idempotency-Key, retried with it until accepted, against the ingest replicas a balancer fronts."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import httpx

INGEST = "/api/v1/webhooks/ingest"
RETRIES = 1200  # a platform retries for minutes; 0.1 s apart, 2 min outlasts any fault here, stalls included


class Answer(NamedTuple):
    at: float  # monotonic time it came
    url: str  # the replica asked
    key: str  # the request's Idempotency-Key
    answer: str  # the status code, or the transport error's class name
    replayed: bool = False  # answered with Idempotent-Replayed: the key's call was queued before


@dataclass
class Load:
    """Calls posted `rate` a second by `workers` posting one after another, each with its own
    Idempotency-Key and retried with it on 503 and broken connections until 201 or 200, as CleverTap
    or Braze do. A call's first try goes to the next replica in turn and each retry to the one after,
    as a balancer skips a replica that fails; a test may replace a URL in `urls` while it runs."""

    urls: list[str]
    key: str
    rate: float
    workers: int = 1
    prefix: str = "load"  # of the Idempotency-Keys, one per load sharing a key
    accepted: dict[str, str] = field(default_factory=dict)  # Idempotency-Key → call id
    accepted_at: dict[str, float] = field(default_factory=dict)  # call id → when its 201 came
    answers: list[Answer] = field(default_factory=list)
    in_flight: dict[str, str] = field(default_factory=dict)  # Idempotency-Key → the URL asked now

    async def run(self, stop: asyncio.Event) -> None:
        numbers = itertools.count()
        async with httpx.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {self.key}"}) as http:
            async with asyncio.TaskGroup() as workers:
                for _ in range(self.workers):
                    workers.create_task(self._post_until(stop, http, numbers))

    async def _post_until(self, stop: asyncio.Event, http: httpx.AsyncClient, numbers: itertools.count[int]) -> None:
        while not stop.is_set():
            await self._post(http, next(numbers))
            await asyncio.sleep(self.workers / self.rate)

    async def _post(self, http: httpx.AsyncClient, n: int) -> None:
        idem = f"{self.prefix}-{n}"
        body = {"agent_slug": "a", "phone_number": f"+4479111{n:05d}", "user_id": f"u-{n}",
                "metadata": {"simulate_duration_seconds": 0.1}}
        for attempt in range(RETRIES):
            url = self.urls[(n + attempt) % len(self.urls)]
            self.in_flight[idem] = url
            try:
                resp = await http.post(url + INGEST, json=body, headers={"Idempotency-Key": idem})
                answer = str(resp.status_code)
            except httpx.TransportError as exc:
                resp, answer = None, type(exc).__name__
            finally:
                del self.in_flight[idem]
            replayed = resp is not None and resp.headers.get("Idempotent-Replayed") == "true"
            self.answers.append(Answer(time.monotonic(), url, idem, answer, replayed))
            if resp is not None and resp.status_code in (200, 201):
                self.accepted[idem] = resp.json()["call_id"]
                self.accepted_at[self.accepted[idem]] = time.monotonic()
                return
            assert resp is None or resp.status_code == 503, f"{idem}: {resp.status_code} {resp.text}"
            await asyncio.sleep(0.1)
        raise AssertionError(f"{idem} never accepted: {self.answers[-5:]}")

    def unavailable(self, since: float, until: float | None = None) -> float:
        """Seconds from the first answer other than 201 in [`since`, `until`) to the next 201 (0: none)."""
        first = next((a.at for a in self.answers if since <= a.at < (until or float("inf"))
                      and a.answer not in ("200", "201")), None)
        if first is None:
            return 0.0
        back = next((a.at for a in self.answers if a.at > first and a.answer in ("200", "201")), time.monotonic())
        return back - first
