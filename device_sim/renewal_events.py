"""One record per automatic renewal, for whoever measures a fleet's renewals.

Every simulated device that renews by itself (:mod:`device_sim.autorenew`) reports the
outcome of each renewal as a :class:`RenewalEvent`. A :class:`~device_sim.runner.SimRun`
collects them from its workers and hands each to ``on_renewal`` (called on the run's
collector thread), keeps them (``run.renewal_events()``) and, with ``renewal_log=PATH``,
appends each as one JSON line to that file (flushed per worker report, about twice a
second). ``run.summary()["renewals"]`` has the totals.

    with SimRun(bundles, config, duration=600, renewal_log=Path("renewals.jsonl")) as run:
        run.wait()
    events = run.renewal_events()            # or read_renewal_events(Path("renewals.jsonl"))
    renewed = [e for e in events if e.outcome == "renewed"]
    buckets = Counter(int(e.wall_time // 10) for e in renewed)    # renewals per 10 s
    latencies = sorted(e.latency_ms for e in renewed if e.latency_ms is not None)

Outcomes:

- ``renewed``: the device got a new certificate and connected with it (the new pair is then
  its bundle). ``wall_time`` is when the certificate arrived; ``latency_ms`` is the
  successful request (CSR published to certificate received); ``total_ms`` runs from the
  first request to the connection with the new certificate (backoffs and retries included).
  ``confirmed`` tells whether the registry acknowledged the device's confirm (None: the run
  ended before it answered or the confirm was not sent).
- ``refused``: the registry refused for a reason retrying cannot fix (e.g.
  ``device_decommissioned``, ``invalid_csr``): the device stops renewing; ``refused`` ends
  with that code.
- ``expired_before_renewal``: the certificate expired before a renewal succeeded (or was
  already expired when the device started): it cannot renew over MQTT any more
  (docs/lifecycle.md gives the recovery).

``attempts`` counts CSRs published, ``retried`` the attempts after the first, ``refused`` the
refusal codes received on the way in order (``rate_limited``, ``busy``, ...), ``timeouts``
the attempts that got no answer in time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = ["RenewalEvent", "RenewalOutcome", "read_renewal_events"]


class RenewalOutcome(StrEnum):
    RENEWED = "renewed"
    REFUSED = "refused"
    EXPIRED_BEFORE_RENEWAL = "expired_before_renewal"


@dataclass(frozen=True, slots=True)
class RenewalEvent:
    """How one renewal of one device ended (picklable: workers send them to the run)."""

    device_id: str
    outcome: RenewalOutcome
    wall_time: float  # Unix time of the outcome
    previous_serial: str  # the certificate being renewed (lower-case hex)
    serial: str | None = None  # the new certificate (renewed only)
    not_after: str | None = None  # of the new certificate, ISO 8601
    latency_ms: float | None = None  # the successful request: CSR published -> certificate
    total_ms: float | None = None  # first request -> connected with the new certificate
    attempts: int = 0
    retried: int = 0
    timeouts: int = 0
    refused: tuple[str, ...] = field(default_factory=tuple)
    confirmed: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["outcome"] = str(self.outcome)
        values["refused"] = list(self.refused)
        return values

    def json_line(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":")) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RenewalEvent:
        return cls(
            **{
                **values,
                "outcome": RenewalOutcome(values["outcome"]),
                "refused": tuple(values.get("refused", ())),
            }
        )


def read_renewal_events(path: Path) -> list[RenewalEvent]:
    """The events a run wrote with ``renewal_log=path``, in the order written."""
    with path.open() as lines:
        return [RenewalEvent.from_dict(json.loads(line)) for line in lines if line.strip()]
