"""The app and NATS images as scripts/build-image builds them (OCI archives, cached), for the tests
that run them."""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_IMAGE = ROOT / "scripts" / "build-image"


@dataclass(frozen=True)
class Images:
    image: str  # e.g. localhost/agent-studio:0.1.0
    archive: Path  # its OCI archive
    nats_image: str
    nats_archive: Path

    @staticmethod
    def repository(image: str) -> str:
        """The name without its tag: what THE import command takes as --base-name."""
        return image.rpartition(":")[0]


@functools.cache
def built_images() -> Images:
    """Builds the images once per test session (a few seconds when nothing changed, ~1 min cold); a
    failing build fails the test with the script's own stderr."""
    proc = subprocess.run(["bash", str(BUILD_IMAGE)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/build-image exited with {proc.returncode}:\n{proc.stderr[-6000:]}")
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    return Images(image=out["IMAGE"], archive=Path(out["IMAGE_ARCHIVE"]),
                  nats_image=out["NATS_IMAGE"], nats_archive=Path(out["NATS_IMAGE_ARCHIVE"]))
