"""The audit log: one entry per change (:func:`add_entry`, inside the change's transaction),
and one device's trail, newest first (:func:`device_audit`).

A device's trail holds the entries whose target is the device id (a batch registration is
one entry per batch, targeted ``"<n> devices"``, and is not listed there). Keyset
pagination on the entry id.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session, col, select

from fleetcore.clock import utcnow
from registry.errors import InvalidRequestError, NotFoundError
from registry.models import AuditLog, Device

__all__ = ["Actor", "AuditEntry", "AuditPage", "add_entry", "device_audit", "entry_row"]


@dataclass(frozen=True, slots=True)
class Actor:
    """Who does something, for the audit log: an identity URI or ``token:<operator>``;
    ``from_addr`` is the socket peer, ``forwarded_for`` what a trusted proxy said; for an
    operator the role they acted with (recorded in the entry's detail as ``role``)."""

    who: str
    from_addr: str | None = None
    forwarded_for: str | None = None
    role: str | None = None


def entry_row(
    actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One audit entry's column values (the row :func:`add_entry` adds; a Core INSERT of
    ``audit_log`` takes it as is)."""
    if actor.role is not None:
        detail = {**(detail or {}), "role": actor.role}
    return {
        "who": actor.who[:256],
        "action": action,
        "target": target[:256],
        "at": utcnow(),
        "from_addr": actor.from_addr,
        "forwarded_for": actor.forwarded_for,
        "detail": detail,
    }


def add_entry(
    session: Session,
    actor: Actor,
    action: str,
    target: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one audit entry to the session's (write) transaction."""
    session.add(AuditLog(**entry_row(actor, action, target, detail)))


class AuditEntry(BaseModel):
    id: int
    at: dt.datetime
    who: str
    action: str
    target: str
    from_addr: str | None
    forwarded_for: str | None = None
    detail: dict[str, Any] | None


class AuditPage(BaseModel):
    entries: list[AuditEntry]
    next_cursor: str | None


def device_audit(
    session: Session, device_id: str, *, limit: int = 100, cursor: str | None = None
) -> AuditPage:
    """One page of ``device_id``'s audit entries, newest first; NotFoundError if unknown."""
    if session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id} is not registered")
    statement = (
        select(AuditLog)
        .where(AuditLog.target == device_id)
        .order_by(col(AuditLog.id).desc())
        .limit(limit + 1)
    )
    if cursor:
        if not cursor.isdigit() or len(cursor) > 19:
            raise InvalidRequestError(
                "cursor is not one this registry handed out; pass next_cursor back unchanged"
            )
        statement = statement.where(col(AuditLog.id) < int(cursor))
    rows = session.exec(statement).all()
    page = rows[:limit]
    return AuditPage(
        entries=[AuditEntry.model_validate(row, from_attributes=True) for row in page],
        next_cursor=str(page[-1].id) if len(rows) > limit and page[-1].id else None,
    )
