"""Session-wide fixtures: one CA minted by our own factory for the whole test run.

Helpers live in :mod:`tests.support`; the names below are re-exported so that older imports
(``from tests.conftest import TestPKI``) keep working.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.pki import TRUST_DOMAIN, ClientFiles, TestPKI, new_pki

__all__ = ["TRUST_DOMAIN", "ClientFiles", "TestPKI", "pki"]

# `alone`: a test that asserts a wall-clock bound (a decommission cut within 1 s, keep-alive
# expiry, bursts answered in time, a node killed under load) carries `@pytest.mark.alone` (or a
# module-level `pytestmark`) itself; `make test` runs those one after another on their own, after
# the rest have run in parallel (xdist). Nothing is marked by folder.


# The broker's metrics port defaults to 127.0.0.1:9883; brokers the tests start (in
# process or as `certfleet broker serve`) take an ephemeral one, so test runs never collide.
os.environ.setdefault("CERTFLEET_BROKER_METRICS_ADDR", "127.0.0.1:0")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestPKI]:
    """A CA (root + issuing) in a temporary data folder, shared by the whole session."""
    yield new_pki(tmp_path_factory.mktemp("certfleet-data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` first: under xdist they then start at once and run beside the
    rest, instead of starting late and holding the parallel phase open on their own."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
