"""Errors the orchestration (`certfleet demo`, `certfleet up`, lifecycle runs) raises.

CertfleetError (fleetcore)
 └── OrchestrationError   a step of `certfleet demo` / `certfleet up` failed
"""

from __future__ import annotations

from fleetcore.errors import CertfleetError

__all__ = ["OrchestrationError"]


class OrchestrationError(CertfleetError):
    """A step of `certfleet demo` / `certfleet up` failed."""
