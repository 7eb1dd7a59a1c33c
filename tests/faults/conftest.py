"""Fault-injection fixtures: the broker tests' real brokers, registries and clients."""

from __future__ import annotations

from tests.support.broker_fixtures import broker, operator, registry

__all__ = ["broker", "operator", "registry"]
