"""No background task of the registry dies silently (issue 11.4, registry side): a crash is
logged, counted and the task restarted; a killed verify worker process does not break
registration for good."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from fleetcore.profile import IdentityKind
from registry.supervise import SupervisedThread
from registry.verify import PARALLEL_MIN, BatchVerifier
from tests.support.pki import TestPKI


def test_a_crashing_body_is_logged_counted_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []
    crashes: list[str] = []
    second_run = threading.Event()

    def body(stopping: threading.Event) -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        second_run.set()
        stopping.wait()

    task = SupervisedThread("test-task", body, on_crash=crashes.append)
    with caplog.at_level(logging.ERROR, logger="registry.supervise"):
        task.start()
        assert second_run.wait(5), "the task was not restarted after its crash"
    task.stop()
    assert not task.alive
    assert crashes == ["test-task"] and task.crashes == 1
    assert "background task crashed task=test-task crashes=1" in caplog.text
    assert "RuntimeError: boom" in caplog.text  # with its traceback


def test_a_body_that_returns_while_not_stopping_counts_as_a_crash() -> None:
    crashes: list[str] = []
    restarted = threading.Event()
    runs: list[int] = []

    def body(stopping: threading.Event) -> None:
        runs.append(1)
        if len(runs) > 1:
            restarted.set()
            stopping.wait()

    task = SupervisedThread("returns", body, on_crash=crashes.append)
    task.start()
    assert restarted.wait(5)
    task.stop()
    assert crashes == ["returns"]


def test_a_killed_verify_worker_is_replaced(pki: TestPKI) -> None:
    crashes: list[str] = []
    verifier = BatchVerifier(pki.ca.issuing_cert, pki.ca.trust_domain, 2, crashes.append)
    pems = [
        pki.ca.issue_client(
            pki.ca.identity(IdentityKind.DEVICE, f"dev-v{i}")
        ).certificate_pem.decode()
        for i in range(PARALLEL_MIN)
    ]
    try:
        assert len(verifier.parse(pems)) == PARALLEL_MIN
        pool = verifier._pool  # noqa: SLF001  (the real worker processes, to kill one)
        assert pool is not None
        victim = next(iter(pool._processes))  # type: ignore[attr-defined]  # noqa: SLF001
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.5)
        assert len(verifier.parse(pems)) == PARALLEL_MIN
        assert crashes == ["verify-pool"]
    finally:
        verifier.close()
