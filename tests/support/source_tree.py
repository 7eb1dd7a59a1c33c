"""The product's source tree, as the architecture tests (tests/architecture/) read it."""

from __future__ import annotations

from pathlib import Path

#: The repository's root folder.
ROOT = Path(__file__).resolve().parents[2]
#: The product's packages (what ships; tests, bench and contrib are not among them).
PACKAGES = ("fleetcore", "factory", "registry", "broker", "device_sim", "certfleet")
