"""The node's connection to NATS: authenticated, optionally TLS, reconnected with backoff.

:class:`ClusterLink` owns one ``nats-py`` client at a time. It connects in the background
(a broker whose NATS is down still starts and serves its local clients), and when the
connection is lost it builds a new one with exponential backoff (0.2 s doubling to
``max_backoff_s``), running every registered *setup* again (subscriptions, JetStream
streams, consumers): one code path for the first connect and every reconnect, so nothing
depends on what the old connection had set up.

A connection can also stop answering without closing (nats-server frozen, a partition that
drops packets, an overloaded server): a watchdog asks NATS for a cheap answer (JetStream's
account info) several times per :attr:`ClusterOptions.stall_s`; none within it marks the link
*stalled* (logged, ``/healthz`` and ``/readyz`` 503, ``cluster_connected`` 0) until NATS
answers again. Every few probes it also checks that the streams the setups made
(:meth:`ClusterLink.require_streams`) still exist: one deleted from outside makes the link
drop the connection and set everything up again, which makes it anew (logged at error level:
what it held is gone).

Credentials (a password, an NKey seed) are never logged; the URL is refused when it holds
them (``nats://user:pass@host``), so they cannot reach a log line through it either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from broker.errors import BrokerError
from fleetcore.config import read_secret_file

__all__ = [
    "ClusterError",
    "ClusterLink",
    "ClusterOptions",
    "NotConnectedError",
    "ensure_stream",
]

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.2
#: Watchdog probes per stall bound, and the probes between two checks of the streams.
_PROBES_PER_STALL = 3
_STREAM_CHECK_EVERY = 4


class ClusterError(BrokerError):
    """The cluster is configured wrongly (bad URL, unreadable credentials)."""


class NotConnectedError(BrokerError):
    """NATS cannot be reached right now (the link is reconnecting)."""


@dataclass(frozen=True)
class ClusterOptions:
    """How to reach NATS (from :class:`broker.settings.BrokerSettings`)."""

    url: str
    node: str
    user: str | None = None
    password: str | None = None
    nkey_seed_file: Path | None = None
    ca_file: Path | None = None
    max_backoff_s: float = 5.0
    connect_timeout_s: float = 2.0
    #: NATS not answering within this is a stall (the link is reported unhealthy).
    stall_s: float = 1.5

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("nats", "tls") or not parts.hostname or parts.port is None:
            raise ClusterError(
                f"cluster URL {parts.scheme}://{parts.hostname}:{parts.port} is not "
                "nats://HOST:PORT or tls://HOST:PORT (CERTFLEET_BROKER_CLUSTER_URL)"
            )
        if parts.username or parts.password:
            raise ClusterError(
                "the cluster URL holds credentials: pass them as CERTFLEET_BROKER_CLUSTER_USER "
                "and CERTFLEET_BROKER_CLUSTER_PASSWORD (or an NKey seed file) instead"
            )
        if self.password and not self.user:
            raise ClusterError("a cluster password needs CERTFLEET_BROKER_CLUSTER_USER too")

    @property
    def display_url(self) -> str:
        return self.url


#: Run on every new connection, before the link reports itself connected.
Setup = Callable[[NatsClient, JetStreamContext], Awaitable[None]]


class ClusterLink:
    """One node's NATS connection, kept up for as long as the broker runs."""

    def __init__(
        self,
        options: ClusterOptions,
        *,
        on_state: Callable[[bool], None] = lambda _connected: None,
        on_stall: Callable[[bool], None] = lambda _stalled: None,
        on_missing: Callable[[], None] = lambda: None,
    ) -> None:
        self.options = options
        self._on_state = on_state
        self._on_stall = on_stall
        self._on_missing = on_missing
        self._required: list[str] = []
        self._created: dict[str, object] = {}
        self._watchdog: asyncio.Task[None] | None = None
        #: When NATS last answered before it stopped (monotonic); None while it answers.
        self.stalled_since: float | None = None
        self._setups: list[Setup] = []
        self._client: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._lost: asyncio.Event | None = None
        self._up: asyncio.Event | None = None
        self.last_error: str | None = None
        self.disconnected_since: float | None = time.monotonic()
        self.reconnects = 0
        self._tls = _tls_context(options.ca_file, options.url)
        self._seed: str | None = None
        if options.nkey_seed_file is not None:
            self._seed = read_secret_file(options.nkey_seed_file, "NKey seed file").decode()

    # -- lifecycle ------------------------------------------------------------------------

    def add_setup(self, setup: Setup) -> None:
        """Run ``setup`` on every connection (now, if connected, at the next one otherwise)."""
        self._setups.append(setup)

    def require_streams(self, *names: str) -> None:
        """JetStream streams the setups make (KV buckets: ``KV_<bucket>``): while connected,
        one found missing makes the link set everything up again."""
        self._required.extend(names)

    def start(self) -> None:
        """Connect in the background and keep connected until :meth:`close`."""
        self._lost = asyncio.Event()
        self._up = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="cluster-link")
        self._watchdog = loop.create_task(self._watch(), name="cluster-link-watchdog")

    async def close(self) -> None:
        # The flag and the event as well as the cancel: a cancel that lands while a setup
        # runs can be swallowed inside nats-py, and the loop must still end.
        self._closing = True
        if self._lost is not None:
            self._lost.set()
        for task in (self._watchdog, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._watchdog = None
        await self._drop_client()

    # -- state ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected and self._js is not None

    @property
    def client(self) -> NatsClient:
        if not self.connected:
            raise NotConnectedError(f"not connected to NATS at {self.options.display_url}")
        assert self._client is not None
        return self._client

    @property
    def js(self) -> JetStreamContext:
        if not self.connected:
            raise NotConnectedError(f"not connected to NATS at {self.options.display_url}")
        assert self._js is not None
        return self._js

    def problems(self) -> list[str]:
        """For /healthz and /readyz: empty while connected and answering."""
        stalled = self.stalled_since
        if self.connected and stalled is not None:
            return [
                f"cluster: NATS at {self.options.display_url} has not answered for "
                f"{time.monotonic() - stalled:.1f}s (stalled: frozen, partitioned or "
                "overloaded); QoS 1 publishes are not acknowledged until it answers"
            ]
        if self.connected:
            return []
        since = self.disconnected_since or time.monotonic()
        return [
            f"cluster: not connected to NATS at {self.options.display_url} for "
            f"{time.monotonic() - since:.1f}s ({self.last_error or 'connecting'}); "
            "QoS 1 publishes are not acknowledged until it is back"
        ]

    # -- the connection loop --------------------------------------------------------------

    async def _run(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self._closing:
            try:
                await self._connect_once()
            except (OSError, nats.errors.Error, TimeoutError, BrokerError) as exc:
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.options.max_backoff_s)
                continue
            if self._closing:
                return
            backoff = _FIRST_BACKOFF_S
            assert self._lost is not None and self._up is not None
            self.stalled_since = None
            self._up.set()
            self._on_state(True)
            await self._lost.wait()
            if self._closing:
                return
            self._lost.clear()
            self._up.clear()
            self.disconnected_since = time.monotonic()
            self._on_state(False)
            await self._drop_client()
            log.warning(
                "cluster link lost url=%s error=%s (reconnecting)",
                self.options.display_url,
                self.last_error,
            )

    def _failed(self, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}"[:200]
        if error != self.last_error:
            log.warning(
                "cluster connect failed url=%s error=%s (retrying with backoff)",
                self.options.display_url,
                error,
            )
        self.last_error = error

    async def _connect_once(self) -> None:
        await self._drop_client()
        assert self._lost is not None
        lost = self._lost

        async def on_closed() -> None:
            # Only this connection's end: closing it ourselves (``_drop_client``, which
            # forgets it first) must not mark the next connection lost at once.
            if self._client is client:
                lost.set()

        async def on_error(exc: Exception) -> None:
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]

        client = NatsClient()
        self._client = client
        await client.connect(
            servers=[self.options.url],
            name=f"certfleet-broker/{self.options.node}",
            allow_reconnect=False,
            connect_timeout=self.options.connect_timeout_s,  # type: ignore[arg-type]
            ping_interval=5,
            max_outstanding_pings=2,
            no_echo=True,
            tls=self._tls,
            user=self.options.user,
            password=self.options.password,
            nkeys_seed_str=self._seed,
            closed_cb=on_closed,
            disconnected_cb=on_closed,
            error_cb=on_error,
        )
        js = client.jetstream(timeout=5)
        self._js = js
        for setup in self._setups:
            await setup(client, js)
        self._created = await self._stream_creations(js)
        self.reconnects += 1
        self.last_error = None
        self.disconnected_since = None
        log.info(
            "cluster link up url=%s node=%s connections=%d",
            self.options.display_url,
            self.options.node,
            self.reconnects,
        )

    # -- the watchdog -----------------------------------------------------------------------

    async def _watch(self) -> None:
        """Probe NATS while connected: a stall and a missing stream are seen within seconds
        (nats-py's own pings take 10 to 15 s to give a frozen server up)."""
        probes = 0
        while True:
            await asyncio.sleep(self.options.stall_s / _PROBES_PER_STALL)
            js, up = self._js, self._up
            if js is None or up is None or not self.connected:
                continue
            probes += 1
            missing: list[str] = []
            try:
                async with asyncio.timeout(self.options.stall_s):
                    await js.account_info()
                    # Not while the setups run: they are making the streams.
                    if up.is_set() and probes % _STREAM_CHECK_EVERY == 0:
                        missing = await self._streams_replaced(js)
            except TimeoutError:
                self._stalled()
                continue
            except (nats.errors.Error, OSError):
                continue  # the connection's own loop reports a lost connection
            self._answered()
            if missing:
                self._set_up_again(missing)

    async def _stream_creations(self, js: JetStreamContext) -> dict[str, object]:
        """When each required stream was created (absent: missing)."""
        created: dict[str, object] = {}
        for name in self._required:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                created[name] = (await js.stream_info(name)).created
        return created

    async def _streams_replaced(self, js: JetStreamContext) -> list[str]:
        """The required streams missing, or made again (by another node that found them
        missing) since this connection's setups ran."""
        now = await self._stream_creations(js)
        return [
            name
            for name in self._required
            if name not in now or now[name] != self._created.get(name)
        ]

    def _stalled(self) -> None:
        if self.stalled_since is not None:
            return
        self.stalled_since = time.monotonic() - self.options.stall_s
        log.warning(
            "cluster link stalled url=%s no_answer_s=%.1f (NATS frozen, partitioned or "
            "overloaded; QoS 1 PUBACKs wait)",
            self.options.display_url,
            self.options.stall_s,
        )
        self._on_stall(True)

    def _answered(self) -> None:
        if self.stalled_since is None:
            return
        log.info(
            "cluster link answers again url=%s stalled_s=%.1f",
            self.options.display_url,
            time.monotonic() - self.stalled_since,
        )
        self.stalled_since = None
        self._on_stall(False)

    def _set_up_again(self, missing: list[str]) -> None:
        self.last_error = f"streams missing: {', '.join(missing)} (made again)"
        log.error(
            "cluster streams missing or made again streams=%s (deleted from outside?): "
            "setting the cluster up again; what they held is lost (docs/faults.md)",
            ",".join(missing),
        )
        self._on_missing()
        if self._lost is not None:
            self._lost.set()

    async def _drop_client(self) -> None:
        client, self._client, self._js = self._client, None, None
        if client is not None and not client.is_closed:
            with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                await asyncio.wait_for(client.close(), 2)


async def ensure_stream(js: JetStreamContext, **config: Any) -> None:
    """Create a JetStream stream, or bring an existing one to ``config``."""
    try:
        await js.add_stream(**config)
    except nats.js.errors.BadRequestError:
        await js.update_stream(**config)


def _tls_context(ca_file: Path | None, url: str) -> ssl.SSLContext | None:
    if ca_file is None:
        if url.startswith("tls://"):
            return ssl.create_default_context()
        return None
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ClusterError(f"cannot read the NATS CA file {ca_file}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
