"""Operator operations: one service function per operation, owning its transaction and
its after-commit effects.

The REST route and every other entry point (the web console, the CLI) call these
functions, so an operation's effects (feed wake-up, metrics, log line, CRL re-sign) happen
the same way whoever asks. Each function opens and closes its own database session: no
connection is held once it returns, and nothing after the commit waits on the database.
"""

from __future__ import annotations

import logging

from sqlmodel import Session

from registry import crud
from registry.models import DecommissionRequest, DecommissionResult
from registry.state import RegistryState

__all__ = ["decommission_device", "revocations_committed"]

log = logging.getLogger(__name__)


def decommission_device(
    state: RegistryState, device_id: str, request: DecommissionRequest, actor: crud.Actor
) -> DecommissionResult:
    """Decommission ``device_id``: revoke its live certificates and append one feed event
    (one transaction), then wake feed readers, count it, log it and request a CRL re-sign
    (coalesced with every other request; returns without waiting for it).

    Raises NotFoundError (404) / AlreadyDecommissionedError (409); a database that cannot be
    reached or a pool that is exhausted surfaces as a 503 through the app's handlers.
    """
    with Session(state.engine) as session:
        result = crud.decommission_device(
            session, device_id, request.reason, actor, reason_code=request.reason_code
        )
    revocations_committed(state, result.revocation_seq, resign=False)
    state.metrics.decommissions.inc()
    log.info(
        "device decommissioned device_id=%s seq=%d reason_code=%s serials=%s by=%s",
        device_id,
        result.revocation_seq,
        request.reason_code,
        ",".join(c.serial for c in result.certificates if c.status == "revoked") or "-",
        actor.who,
    )
    state.crl.request_resign()
    return result


def revocations_committed(state: RegistryState, last_seq: int, *, resign: bool = True) -> None:
    """After-commit effects of any feed event up to ``last_seq`` (a decommission, superseded
    certificates): the feed mark, the long-poll wake-up and (``resign``) a CRL re-sign."""
    if state.mark is not None:
        state.mark.advance(last_seq)
    state.feed.published()
    if resign:
        state.crl.request_resign()
