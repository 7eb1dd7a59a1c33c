"""Reusable NATS fixtures: a real nats-server per test on an ephemeral port, JetStream in
tmp_path, authentication on (skips visibly when the binary is absent).

Import the fixture into a conftest (``from tests.support.nats import nats_server``), or use
:func:`start_nats` from a bench.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from broker.cluster.natsd import INSTALL_HINT, LocalNats, find_nats_server

__all__ = ["admin_connect", "nats_server", "start_nats"]


def start_nats(folder: Path) -> LocalNats:
    """A started nats-server in ``folder``; pytest skip (with the install hint) if absent."""
    if find_nats_server() is None:
        pytest.skip(f"nats-server not installed ({INSTALL_HINT})")
    return LocalNats(folder).start()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[LocalNats]:
    server = start_nats(tmp_path / "nats")
    try:
        yield server
    finally:
        server.stop()


async def admin_connect(server: LocalNats) -> nats.NATS:
    """A client of ``server`` with its credentials: what an operator's ``nats`` CLI is (it
    deletes streams, reads their configuration)."""
    return await nats.connect(
        server.url, user=server.credentials.user, password=server.credentials.password
    )
