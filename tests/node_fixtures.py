"""The session's real single-node cluster (tests/node.py), started on first use; conftest.py imports it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node import Node


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """One node for the whole session. A missing part fails (never skips) with the script that builds it."""
    cluster = Node(tmp_path_factory.mktemp("node")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
