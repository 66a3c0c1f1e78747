"""Latency figures the benchmarks print, computed one way (nearest rank, in milliseconds)."""

from __future__ import annotations

import statistics


def percentile(seconds: list[float], p: float) -> float:
    """The p-th percentile of `seconds`, nearest rank, in seconds."""
    ordered = sorted(seconds)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(seconds: list[float], percentiles: tuple[int, ...] = (99,)) -> dict[str, float]:
    """p50_ms, p<N>_ms for each of `percentiles`, max_ms and n."""
    out = {"p50_ms": statistics.median(seconds) * 1000}
    out.update({f"p{p}_ms": percentile(seconds, p) * 1000 for p in percentiles})
    return {**out, "max_ms": max(seconds) * 1000, "n": len(seconds)}
