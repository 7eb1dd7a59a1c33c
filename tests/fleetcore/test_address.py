"""One host:port type for every part: parsed once, refused with one clear line."""

from __future__ import annotations

import pytest

from broker.settings import build_settings as broker_settings
from certfleet.settings import build_settings as orchestrate_settings
from device_sim.settings import build_settings as sim_settings
from device_sim.settings import parse_addr
from fleetcore.address import Address, parse_address
from fleetcore.errors import ConfigError
from registry.settings import build_settings as registry_settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8883", Address("127.0.0.1", 8883)),
        ("localhost:0", Address("localhost", 0)),
        ("[::1]:8443", Address("::1", 8443)),
        ("host.example:65535", Address("host.example", 65535)),
    ],
)
def test_good_addresses(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("127.0.0.1:99999", "port 99999 is outside 0..65535"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1", "is not host:port"),
        (":8883", "is not host:port"),
        ("::1:8883", "put an IPv6 host in brackets"),
        ("[::1:8883", "unclosed"),
        ("[nothost]:8883", "no IPv6 address"),
        ("a b:1", "no usable host"),
    ],
)
def test_bad_addresses_are_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(".", r"\.")) as caught:
        parse_address(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("build", "field", "variable"),
    [
        (broker_settings, "broker_addr", "CERTFLEET_BROKER_ADDR"),
        (broker_settings, "broker_metrics_addr", "CERTFLEET_BROKER_METRICS_ADDR"),
        (registry_settings, "registry_addr", "CERTFLEET_REGISTRY_ADDR"),
        (registry_settings, "telemetry_broker_addr", "CERTFLEET_TELEMETRY_BROKER_ADDR"),
        (sim_settings, "broker_addr", "CERTFLEET_BROKER_ADDR"),
        (orchestrate_settings, "broker_addr", "CERTFLEET_BROKER_ADDR"),
        (orchestrate_settings, "registry_addr", "CERTFLEET_REGISTRY_ADDR"),
    ],
)
def test_every_settings_object_refuses_a_bad_address(
    build: object, field: str, variable: str
) -> None:
    assert callable(build)
    with pytest.raises(ConfigError, match=f"{variable}.*port 99999 is outside") as caught:
        build(**{field: "127.0.0.1:99999"})
    assert "\n" not in str(caught.value)


def test_a_device_needs_a_real_port() -> None:
    with pytest.raises(ConfigError, match="needs a real port"):
        parse_addr("127.0.0.1:0")
