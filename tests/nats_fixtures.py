"""Moved to :mod:`tests.support.nats`; kept so existing imports still work."""

from tests.support.nats import nats_server, start_nats

__all__ = ["nats_server", "start_nats"]
