"""One validated ``host:port`` address type for every part's settings.

``parse_address("127.0.0.1:8883")`` -> ``Address("127.0.0.1", 8883)``; IPv6 hosts go in
brackets (``[::1]:8883``); the port is 0..65535 (0 = ephemeral, for listeners). A bad value
is a :class:`~fleetcore.errors.ConfigError` saying what is wrong, never an OverflowError from
the socket layer. Settings fields use :data:`AddressStr` (a string validated on load, so a
bad ``CERTFLEET_*_ADDR`` is one line naming the variable) and parse it where they bind or
connect.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

from fleetcore.errors import ConfigError

__all__ = ["MAX_PORT", "Address", "AddressStr", "parse_address"]

MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class Address:
    """A host (name, IPv4 or IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``host:port`` or ``[ipv6]:port`` -> :class:`Address`; ConfigError when malformed."""
    example = "(e.g. 127.0.0.1:8883 or [::1]:8883)"
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {text!r} is not host:port {example}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"address {text!r} has an unclosed '[' {example}")
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"address {text!r}: {host!r} in brackets is no IPv6 address"
            ) from None
    elif ":" in host:
        raise ConfigError(f"address {text!r}: put an IPv6 host in brackets, e.g. [::1]:8883")
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"address {text!r} has no usable host {example}")
    if not port_text.isdigit():
        raise ConfigError(f"address {text!r}: port {port_text!r} is not a number 0..{MAX_PORT}")
    port = int(port_text)
    if port > MAX_PORT:
        raise ConfigError(f"address {text!r}: port {port} is outside 0..{MAX_PORT}")
    return Address(host, port)


def _validated(text: str) -> str:
    try:
        return str(parse_address(text))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


#: A settings field holding ``host:port``, validated (and normalised) when settings load.
AddressStr = Annotated[str, AfterValidator(_validated)]
