"""How every bench reports: its JSON printed and saved as bench/results/<name>.json, a PNG beside it,
and py-spy's stacks of a process while a phase runs."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, out: Any, plot: Callable[[Any], Any] | None = None) -> None:
    """Prints `out`, writes it to results/<name>.json and, given `plot` (out -> a matplotlib Figure), <name>.png."""
    text = json.dumps(out, indent=2)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(text)
    if plot is not None:
        plot(out).savefig(RESULTS / f"{name}.png", dpi=100)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: benches run where there is no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def py_spy(pid: int, path: Path | None, rate: int = 200) -> Iterator[None]:
    """py-spy recording `pid` (raw, collapsed stacks, to `path`) while the block runs; nothing when path is None."""
    if path is None:
        yield
        return
    proc = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-r", str(rate),
                             "-f", "raw", "-o", str(path), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1)  # attached before the measured phase starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its stacks when interrupted
        _, err = proc.communicate(timeout=60)
        if not path.exists():
            raise RuntimeError(f"py-spy failed: {err.decode()[-2000:]}")
