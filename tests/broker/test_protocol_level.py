"""Only MQTT 3.1.1 gets in: MQTT 5 and MQTT 3.1 are answered CONNACK 0x01 (unacceptable
protocol version) and counted as ``unsupported_protocol``, never as a client id mismatch."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from broker.auth import Refusal
from broker.server import BrokerServer
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device


@pytest.mark.parametrize(
    ("protocol", "answer"),
    [(mqtt.MQTTv5, "Unsupported protocol version"), (mqtt.MQTTv31, "Unsupported protocol version")],
)
def test_other_protocol_levels_are_refused_as_such(
    pki: TestPKI,
    broker: BrokerServer,
    tmp_path: Path,
    protocol: mqtt.MQTTProtocolVersion,
    answer: str,
) -> None:
    files = issue_device(pki, tmp_path, "dev-proto")
    unsupported = broker.metrics.refusal_count(Refusal.UNSUPPORTED_PROTOCOL.value)
    mismatch = broker.metrics.refusal_count(Refusal.CLIENT_ID_MISMATCH.value)
    probe = connect(broker.port, files, "dev-proto", protocol=protocol)
    try:
        assert not probe.connected.is_set()
        assert probe.reason == answer, probe.reason
    finally:
        probe.close()
    assert broker.metrics.refusal_count(Refusal.UNSUPPORTED_PROTOCOL.value) == unsupported + 1
    assert broker.metrics.refusal_count(Refusal.CLIENT_ID_MISMATCH.value) == mismatch
    ok = connect(broker.port, files, "dev-proto")  # the same device over MQTT 3.1.1
    assert ok.connected.is_set(), ok.reason
    ok.close()
