"""Issuing CAs revoked by the root (issue 26, ``certfleet ca revoke-issuing``), as the broker
learns them from the revocation feed's ``issuer_revoked`` events.

Their key ids go to :attr:`broker.auth.AdmissionPolicy.revoked_issuers` (every certificate
they signed is refused at CONNECT) and are kept in ``<data>/broker/revoked-issuers.json``,
read at start: the feed's cursor has moved past the event by then, and the TLS store of a
broker started with an old ``trust.pem`` would still trust the CA.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fleetcore.layout import write_durable

__all__ = ["RevokedIssuers"]

log = logging.getLogger(__name__)

FILE_NAME = "revoked-issuers.json"


class RevokedIssuers:
    """The revoked issuing CAs' key ids, persisted in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self._path = folder / FILE_NAME
        self._ids: set[str] = set()

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(self._ids)

    def load(self) -> frozenset[str]:
        try:
            value = json.loads(self._path.read_text())
        except FileNotFoundError:
            return self.ids
        except (OSError, ValueError) as exc:
            log.error("revoked issuing CAs unreadable path=%s error=%s", self._path, exc)
            return self.ids
        if isinstance(value, list):
            self._ids = {str(key_id).lower() for key_id in value}
        return self.ids

    def add(self, key_id: str) -> bool:
        """Record ``key_id`` (durably); True when it is new."""
        key_id = key_id.lower()
        if key_id in self._ids:
            return False
        self._ids.add(key_id)
        write_durable(self._path, json.dumps(sorted(self._ids)).encode(), 0o644)
        return True
