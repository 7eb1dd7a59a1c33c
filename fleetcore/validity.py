"""The validity policy: when a device certificate starts and when it ends.

One place for every path that issues a device certificate: provisioning
(``factory.provision``), signing a device's CSR (``certfleet factory sign-csr``) and renewal
over MQTT (``registry.renewal``).

- ``not_before`` is the issue time minus :data:`~fleetcore.profile.CLOCK_SKEW`, so a device
  whose clock is a little slow accepts the certificate at once;
- a new certificate ends ``lifetime`` after its issue time (for a batch: after the batch's
  start, so a long batch does not drift), plus its offset into the stagger window
  (:mod:`fleetcore.stagger`): no day of the fleet's expiry holds more than its share;
- a renewed certificate keeps the validity *length* (``not_after - not_before``) it is given,
  plus its offset into a stagger window (none unless one is asked for).

Times are whole seconds, as the certificate holds them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from fleetcore.profile import CLOCK_SKEW
from fleetcore.stagger import offset_in_window

__all__ = ["NO_STAGGER", "Validity", "new_validity", "renewal_validity"]

NO_STAGGER = dt.timedelta(0)


@dataclass(frozen=True, slots=True)
class Validity:
    """A certificate's validity period."""

    not_before: dt.datetime
    not_after: dt.datetime


def _whole_seconds(moment: dt.datetime) -> dt.datetime:
    return moment.replace(microsecond=0)


def new_validity(
    issued_at: dt.datetime,
    lifetime: dt.timedelta,
    *,
    stagger: dt.timedelta = NO_STAGGER,
    fraction: float = 0.0,
    expiry_base: dt.datetime | None = None,
) -> Validity:
    """A new device certificate's validity.

    ``fraction`` (0 <= f < 1) is the device's place in the ``stagger`` window (its batch
    rank's :func:`~fleetcore.stagger.stagger_fraction`, or
    :func:`~fleetcore.stagger.stagger_fraction_for_id`); ``expiry_base`` is the moment the
    lifetime counts from when it is not ``issued_at`` (a batch's start).
    """
    base = issued_at if expiry_base is None else expiry_base
    return Validity(
        not_before=_whole_seconds(issued_at - CLOCK_SKEW),
        not_after=_whole_seconds(base + lifetime) + offset_in_window(fraction, stagger),
    )


def renewal_validity(
    issued_at: dt.datetime,
    length: dt.timedelta,
    *,
    stagger: dt.timedelta = NO_STAGGER,
    fraction: float = 0.0,
) -> Validity:
    """A renewed certificate's validity: ``length`` from its not_before, plus its offset."""
    not_before = _whole_seconds(issued_at - CLOCK_SKEW)
    return Validity(
        not_before=not_before,
        not_after=not_before + length + offset_in_window(fraction, stagger),
    )
