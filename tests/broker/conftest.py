"""Broker test fixtures: a broker per test on 127.0.0.1:0 and real paho clients.

The helpers live in :mod:`tests.support`; they are re-exported here so that older imports
(``from tests.broker.conftest import connect``) keep working.
"""

from __future__ import annotations

from tests.support.broker_fixtures import broker, operator, registry
from tests.support.mqtt import MqttProbe, connect
from tests.support.pki import issue_device
from tests.support.servers import broker_data_dir, broker_settings, feed_broker_layout, register
from tests.support.tls import tls_context
from tests.support.waits import wait_for

__all__ = [
    "MqttProbe",
    "broker",
    "broker_data_dir",
    "broker_settings",
    "connect",
    "feed_broker_layout",
    "issue_device",
    "operator",
    "register",
    "registry",
    "tls_context",
    "wait_for",
]
