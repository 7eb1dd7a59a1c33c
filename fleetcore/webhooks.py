"""The one rule for a claim's pre-enrollment webhook URL (checked by ``certfleet factory
claim create --webhook`` before anything is minted, and by the registry when the claim is
recorded).

- ``https://host[:port][/path][?query]``: the registry verifies the server's certificate
  against the system's trust store;
- ``http://`` only to a loopback host (``127.0.0.0/8``, ``::1``, ``localhost``): a sidecar
  on the registry's own machine, or a test; plain HTTP across a network would let anyone on
  the path approve enrollments;
- no user name or password in the URL (it is stored with the claim, listed to operators and
  named in error messages), no fragment, at most :data:`MAX_WEBHOOK_URL` characters.

Messages and logs name the URL by :func:`shown_url` (without its query, which may carry a
token).
"""

from __future__ import annotations

import ipaddress
from typing import Final
from urllib.parse import urlsplit

from fleetcore.errors import ConfigError

__all__ = ["MAX_WEBHOOK_URL", "check_webhook_url", "shown_url"]

MAX_WEBHOOK_URL: Final = 2048


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_url(url: str) -> str:
    """``url`` when it is a usable claim webhook (module doc); ConfigError saying why not."""
    if len(url) > MAX_WEBHOOK_URL or any(c.isspace() for c in url):
        raise ConfigError(
            f"webhook URL {url[:80]!r} is longer than {MAX_WEBHOOK_URL} characters or holds spaces"
        )
    parts = urlsplit(url)
    try:
        host, _port = parts.hostname, parts.port
    except ValueError:
        raise ConfigError(f"webhook URL {shown_url(url)!r} has an invalid port") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(
            f"webhook URL {shown_url(url)!r} is not https://host[:port][/path] "
            "(http:// only to a loopback address)"
        )
    if parts.scheme == "http" and not _loopback(host):
        raise ConfigError(
            f"webhook URL {shown_url(url)!r} is plain http to {host}: use https (plain http "
            "only to a loopback address such as 127.0.0.1, for a local sidecar or a test)"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            "the webhook URL carries a user name or password; the registry stores and lists "
            "it: authenticate the webhook otherwise (e.g. its own allow-list of the registry)"
        )
    if parts.fragment:
        raise ConfigError(f"webhook URL {shown_url(url)!r} has a #fragment; drop it")
    return url


def shown_url(url: str) -> str:
    """``url`` as messages and logs name it: without query, fragment and credentials."""
    parts = urlsplit(url)
    try:
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        netloc = "?"
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"
