"""Assemble and run the broker: amqtt + our listener + revocation follower + metrics.

:class:`BrokerApp` builds every piece once, in dependency order, and passes each what it
needs: revoked set -> admission policy -> CONNECT gate; topic ACL; session index; then, on
the loop, the amqtt broker (wired with the gate and the ACL) and the listener (broker, gate,
index). Revocations reach live sessions through :meth:`SessionIndex.drop`.

- :class:`BrokerApp` is the async core (start/stop on a running loop).
- :class:`BrokerServer` runs a BrokerApp in its own thread and event loop (tests, demo):
  ``with BrokerServer(settings) as broker: broker.port``.
- :func:`serve` runs until cancelled; ``certfleet broker serve`` uses it.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from broker.acl import TopicAcl
from broker.amqtt_adapter import CertfleetBroker
from broker.amqtt_cluster_routing import ClusterBroker
from broker.auth import AdmissionPolicy
from broker.cluster.node import ClusterNode, cluster_options
from broker.errors import BrokerError
from broker.gate import ConnectGate
from broker.gc_pauses import GcPauses
from broker.issuers import RevokedIssuers
from broker.listener import MqttTlsListener
from broker.loop_lag import watch_loop_lag
from broker.metrics import BrokerMetrics
from broker.persistence import StateFile, state_path
from broker.revocation import RevocationFollower, RevokedSet
from broker.session_index import SessionIndex
from broker.sessions import session_key
from broker.settings import BrokerSettings
from broker.state import BrokerState, StateStore, StoredMessage
from broker.supervisor import Supervisor
from broker.tls import TrustReloader, broker_server_context, feed_client_context
from fleetcore.address import Address, parse_address
from fleetcore.layout import write_public
from fleetcore.profile import Identity, IdentityKind
from fleetcore.revocation_feed import RevocationEvent

__all__ = ["BrokerApp", "BrokerServer", "serve"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 30.0

T = TypeVar("T")


def _trust_domain(settings: BrokerSettings) -> str:
    meta = settings.layout.ca_meta
    try:
        return str(json.loads(meta.read_text())["trust_domain"])
    except (OSError, ValueError, KeyError) as exc:
        raise BrokerError(
            f"cannot read the trust domain from {meta} ({exc}): run 'certfleet ca init' or "
            "pass the right --data-dir"
        ) from None


class BrokerApp:
    """One broker on the running event loop.

    ``state_store`` keeps persistent sessions and retained messages across restarts; by
    default the node's state file (:class:`broker.persistence.StateFile`, off with
    ``CERTFLEET_BROKER_PERSIST=false``). A cluster passes its own store.
    """

    def __init__(self, settings: BrokerSettings, state_store: StateStore | None = None) -> None:
        self.settings = settings
        layout = settings.layout
        self.trust_domain = _trust_domain(settings)
        self.ssl_context = broker_server_context(layout, settings.broker_name)
        self.trust_reloader = TrustReloader(layout, self.ssl_context)
        self.metrics = BrokerMetrics()
        self.gc_pauses = GcPauses(
            lambda generation, seconds: self.metrics.gc_pause.labels(str(generation)).observe(
                seconds
            )
        )
        self.revoked = RevokedSet(
            layout.broker_dir,
            settings.broker_node,
            on_write=self._revoked_written,
            fsync_s=settings.broker_journal_fsync_s,
        )
        self.revoked.load()
        self.supervisor = Supervisor(lambda name: self.metrics.task_restarts.labels(name).inc())
        self.policy = AdmissionPolicy(self.trust_domain, self.revoked, settings.broker_client_id)
        self.revoked_issuers = RevokedIssuers(layout.broker_dir)
        self.policy.revoked_issuers = self.revoked_issuers.load()
        self.gate = ConnectGate(
            self.policy,
            self.metrics,
            connect_timeout_s=settings.broker_connect_timeout_s,
            max_packet_bytes=settings.broker_max_packet_bytes,
            renewal_service=settings.broker_renewal_service,
        )
        self.acl = TopicAcl(
            self.trust_domain,
            renewal_service=settings.broker_renewal_service,
            count=lambda action, allowed: self.metrics.count_acl(action.value, allowed),
        )
        self.sessions = SessionIndex()
        self.state_store = state_store if state_store is not None else self._local_state_store()
        self.follower: RevocationFollower | None = None
        if settings.registry_url:
            self.follower = RevocationFollower(
                registry_url=settings.registry_url,
                revoked=self.revoked,
                on_revoked=self._on_revoked,
                tls_context=feed_client_context(layout, settings.broker_name),
                wait_s=settings.broker_feed_wait_s,
                max_backoff_s=settings.broker_feed_max_backoff_s,
                resync_s=settings.broker_feed_resync_s,
            )
            follower = self.follower
            self.metrics.feed_last_success.set_function(lambda: follower.last_success_at)
        options = cluster_options(settings)
        self.cluster = (
            ClusterNode(
                options,
                self.metrics,
                session_expiry_s=settings.broker_session_expiry_s,
                shared_prefer_local=settings.broker_shared_prefer_local,
            )
            if options is not None
            else None
        )
        self.broker: CertfleetBroker | None = None
        self.listener: MqttTlsListener | None = None
        self.port = 0
        self.metrics_port: int | None = None

    async def start(self) -> None:
        # A cluster node's broker routes through the cluster (broker/amqtt_cluster_routing.py).
        clustered = ClusterBroker if self.cluster is not None else CertfleetBroker
        self.broker = broker = clustered(
            gate=self.gate,
            acl=self.acl,
            session_expiry_s=self.settings.broker_session_expiry_s,
            on_route_error=lambda _exc: self.metrics.route_errors.inc(),
            on_retain_refused=self.metrics.acl_refusals.labels("retain").inc,
        )
        self.broker.shared.count(
            handed_over=self.metrics.shared_handed_over.inc, lost=self.metrics.shared_lost.inc
        )
        self.listener = MqttTlsListener(
            broker=self.broker,
            ssl_context=self.ssl_context,
            gate=self.gate,
            sessions=self.sessions,
            metrics=self.metrics,
            handshake_timeout_s=self.settings.broker_handshake_timeout_s,
            max_packet_bytes=self.settings.broker_max_packet_bytes,
        )
        await self.broker.start()
        if self.state_store is not None:
            await self._restore_state(self.state_store)
        if self.cluster is not None and isinstance(broker, ClusterBroker):
            self.cluster.attach(broker, self._close_session)
            self.cluster.start()
        address = parse_address(self.settings.broker_addr)
        host, port = address.host, address.port
        try:
            self.port = await self.listener.start(
                host, port, reuse_port=self.settings.broker_reuse_port
            )
        except OSError as exc:
            if self.cluster is not None:
                await self.cluster.stop()
            await self.broker.shutdown()
            raise BrokerError(f"cannot listen on {self.settings.broker_addr}: {exc}") from None
        if self.settings.broker_metrics_addr:
            metrics = parse_address(self.settings.broker_metrics_addr)
            metrics_host, metrics_port = metrics.host, metrics.port
            self.metrics_port = self.metrics.serve(
                metrics_host, metrics_port, self.problems, self.not_ready
            )
        self.metrics.revoked_serials.set(self.revoked.serial_count)
        self.metrics.revocation_seq.set(self.revoked.last_seq)
        self.supervisor.start("loop-lag", lambda: watch_loop_lag(self.metrics.loop_lag.observe))
        self.gc_pauses.start()
        self.supervisor.start("revoked-set-writer", self.revoked.keep_persisted)
        self.supervisor.start("trust-reloader", self.trust_reloader.run)
        self.supervisor.start(
            "revoked-set-pruner",
            lambda: self.revoked.keep_pruned(self.settings.broker_prune_s, self._pruned),
        )
        if self.follower is not None:
            self.supervisor.start("revocation-feed", self.follower.run)
        store = self.state_store
        if store is not None:
            self.supervisor.start("state-autosave", lambda: store.keep_saved(self._snapshot))
        log.info(
            "broker listening addr=%s:%d trust_domain=%s revoked_serials=%d registry=%s "
            "node=%s cluster=%s",
            host,
            self.port,
            self.trust_domain,
            self.revoked.serial_count,
            self.settings.registry_url or "none",
            self.settings.broker_node,
            self.settings.broker_cluster_url or "none",
        )

    def _close_session(self, session_key: str) -> bool:
        """Close this node's live connection of a session key (taken over on another node)."""
        live = self.sessions.session_of_key(session_key)
        if live is None or live.connection.is_closed:
            return False
        live.connection.abort()
        return True

    def _pruned(self, count: int) -> None:
        self.metrics.revoked_expired.inc(count)
        self.metrics.revoked_serials.set(self.revoked.serial_count)

    def _local_state_store(self) -> StateFile | None:
        if not self.settings.broker_persist or self.settings.broker_cluster_url:
            return None  # a cluster node's sessions live in JetStream (docs/cluster.md)
        return StateFile(
            state_path(self.settings.layout.broker_dir, self.settings.broker_node),
            node=self.settings.broker_node,
            interval_s=self.settings.broker_persist_interval_s,
            on_write=self._state_written,
            on_load_failure=self.metrics.state_load_failures.inc,
        )

    def _state_written(self, ok: bool, state: BrokerState) -> None:
        self.metrics.state_persisted.set(1 if ok else 0)
        if not ok:
            self.metrics.state_persist_failures.inc()
            return
        self.metrics.state_sessions.set(len(state.sessions))
        self.metrics.state_queued.set(state.queued_count)

    def _device_key(self, device_id: str) -> str:
        return session_key(Identity(self.trust_domain, IdentityKind.DEVICE, device_id))

    async def _restore_state(self, store: StateStore) -> None:
        """Persistent sessions and retained messages of the last run, before listening;
        not the sessions of devices decommissioned meanwhile (as far as the revoked set
        knows; the feed drops the others as it catches up)."""
        assert self.broker is not None
        state = store.load()
        kept = tuple(s for s in state.sessions if not self._decommissioned(s.key))
        restored = await self.broker.restore_state(BrokerState(kept, state.retained))
        self._state_written(True, state)
        if state.sessions or state.retained:
            log.info(
                "broker state restored sessions=%d skipped_decommissioned=%d queued=%d retained=%d",
                restored,
                len(state.sessions) - len(kept),
                sum(len(s.queued) for s in kept),
                len(state.retained),
            )

    def _decommissioned(self, key: str) -> bool:
        identity = self.acl.identity_of(key)
        return (
            identity is not None
            and identity.kind is IdentityKind.DEVICE
            and self.revoked.is_device_decommissioned(identity.name)
        )

    def _snapshot(self, inflight: dict[str, list[StoredMessage]] | None = None) -> BrokerState:
        """The state to keep: every persistent session but those of decommissioned devices
        (discarded from amqtt here once their last connection is gone)."""
        assert self.broker is not None
        state = self.broker.persistent_state(inflight)
        gone = [s.key for s in state.sessions if self._decommissioned(s.key)]
        if not gone:
            return state
        for key in gone:
            self.broker.discard_session(key)
        kept = tuple(s for s in state.sessions if s.key not in set(gone))
        return BrokerState(kept, state.retained)

    def _revoked_written(self, ok: bool) -> None:
        self.metrics.revoked_persisted.set(1 if ok else 0)
        if not ok:
            self.metrics.persist_failures.inc()

    def not_ready(self) -> list[str]:
        """What the broker still waits for before it takes traffic as intended, for /readyz
        (empty: ready). Any thread."""
        waiting = [] if self.port else ["the MQTT listener"]
        if self.follower is not None:
            waiting += self.follower.not_following()
        if self.cluster is not None:
            waiting += self.cluster.problems()
        return waiting

    def problems(self) -> list[str]:
        """What is wrong right now, for /healthz (empty: healthy). Any thread."""
        found = []
        if self.revoked.dirty:
            found.append(
                f"revoked set not persisted to {self.revoked.folder}: {self.revoked.persist_error} "
                "(enforced in memory; retrying)"
            )
        if self.state_store is not None:
            found += self.state_store.problems()
        found += [
            f"task {name} failed: {error} (restarting)"
            for name, error in dict(self.supervisor.failing).items()
        ]
        if self.cluster is not None:
            found += self.cluster.problems()
        return found

    async def stop(self) -> None:
        """Stop in the order that keeps what was acknowledged: background tasks; the clients
        (after amqtt routed what they sent); then the final state save; then amqtt."""
        await self.supervisor.stop()
        self.gc_pauses.stop()
        self.revoked.close()
        inflight: dict[str, list[StoredMessage]] = {}
        if self.broker is not None and self.state_store is not None:
            inflight = self.broker.capture_inflight()
        if self.listener is not None:
            await self.listener.close()
        if self.cluster is not None:
            await self.cluster.stop()
        if self.broker is not None:
            if self.state_store is not None:
                if not await self.broker.wait_routed():
                    log.warning("broker stopping with messages still unrouted")
                await self.state_store.save(self._snapshot(inflight))
            await self.broker.shutdown()
        self.metrics.close()
        log.info("broker stopped")

    def _on_revoked(self, event: RevocationEvent, new_serials: list[str]) -> None:
        if event.kind == "issuer_revoked" and event.issuer:
            if self.revoked_issuers.add(event.issuer):
                log.warning("issuing CA revoked key_id=%s seq=%d", event.issuer, event.seq)
            self.policy.revoked_issuers = self.revoked_issuers.ids
        # A superseded event revokes serials only: the device's new-certificate session stays.
        device_id = event.device_id if event.kind == "decommission" else None
        dropped = self._drop(new_serials, device_id)
        if device_id is not None:
            self._forget_device_session(device_id)
        self.metrics.revoked_serials.set(self.revoked.serial_count)
        self.metrics.revocation_seq.set(event.seq)
        self.metrics.revocation_lag.observe(max(0.0, time.time() - event.revoked_at.timestamp()))
        if dropped:
            log.info(
                "revocation applied device_id=%s sessions_dropped=%d", event.device_id, dropped
            )

    def revoke(self, serials: list[str], device_id: str | None = None) -> int:
        """Revoke serials locally (no registry): persist, drop live sessions. Loop thread only."""
        new = self.revoked.add(serials, device_id)
        self.revoked.save(durable=True)  # no feed to read it again from
        self.metrics.revoked_serials.set(self.revoked.serial_count)
        dropped = self._drop(new, device_id)
        if device_id is not None:
            self._forget_device_session(device_id)
        return dropped

    def _forget_device_session(self, device_id: str) -> None:
        """A decommissioned device's offline session (subscriptions, queue) is discarded,
        so it is neither kept in memory nor saved for the next run."""
        if self.broker is not None and self.broker.discard_session(self._device_key(device_id)):
            log.info("session discarded reason=decommissioned device_id=%s", device_id)

    def _drop(self, serials: list[str], device_id: str | None) -> int:
        """Disconnect the live sessions of revoked serials / a decommissioned device."""
        dropped = self.sessions.drop(serials, device_id)
        self.metrics.sessions_dropped.inc(len(dropped))
        return len(dropped)


def _where_it_waits(loop: asyncio.AbstractEventLoop | None) -> str:
    """Where each pending task of the stuck loop waits, then every thread's stack (read from
    another thread: a diagnostic, racy but enough to name the task)."""
    lines: list[str] = []
    try:
        tasks = list(asyncio.all_tasks(loop)) if loop is not None else []
    except RuntimeError:  # the set changed while read
        tasks = []
    for task in tasks[:20]:
        stack = task.get_stack(limit=3)
        where = " <- ".join(
            f"{f.f_code.co_name} {Path(f.f_code.co_filename).name}:{f.f_lineno}" for f in stack
        )
        lines.append(f"task {task.get_name()}: {where or '(no frame)'}")
    with tempfile.TemporaryFile() as out:
        faulthandler.dump_traceback(out, all_threads=True)
        out.seek(0)
        lines.append(out.read().decode(errors="replace"))
    return "\n".join(lines)[:6000]


def _new_loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class BrokerServer:
    """A broker in its own thread and event loop; a context manager exposing ``.port``."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.app: BrokerApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started: Future[None] = Future()
        self._stop: asyncio.Event | None = None

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port

    @property
    def metrics(self) -> BrokerMetrics:
        assert self.app is not None
        return self.app.metrics

    @property
    def metrics_url(self) -> str | None:
        if self.app is None or self.app.metrics_port is None:
            return None
        host = parse_address(self.settings.broker_metrics_addr or "127.0.0.1:0").host
        return f"http://{Address(host, self.app.metrics_port)}/metrics"

    def start(self) -> BrokerServer:
        self._thread = threading.Thread(target=self._run, name="certfleet-broker", daemon=True)
        self._thread.start()
        self._started.result(timeout=60)
        return self

    def _run(self) -> None:
        # A Runner, as asyncio.run: what is still pending when _main returns (a library's
        # background task, such as nats-py's consumer heartbeats) is cancelled and awaited
        # before the loop closes, not destroyed pending.
        use_uvloop = self.settings.broker_uvloop
        with asyncio.Runner(loop_factory=lambda: _new_loop(use_uvloop)) as runner:
            self._loop = runner.get_loop()
            asyncio.set_event_loop(self._loop)
            runner.run(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            self.app = BrokerApp(self.settings)
            await self.app.start()
        except BaseException as exc:
            self._started.set_exception(exc)
            return
        self._started.set_result(None)
        await self._stop.wait()
        await self.app.stop()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the broker's loop and return its result (thread-safe)."""
        assert self._loop is not None

        async def _call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(_call(), self._loop).result(timeout=30)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the broker's loop and return its result (thread-safe)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def revoke(self, serials: list[str], device_id: str | None = None) -> int:
        """Revoke serials without a registry (tests); returns the sessions dropped."""
        app = self.app
        assert app is not None
        return self.call(lambda: app.revoke(serials, device_id))

    def stop(self) -> None:
        """Stop the broker and wait for its loop to end (raises if it does not in 30 s)."""
        thread = self._thread
        if self._loop is not None and self._stop is not None and thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            thread.join(timeout=_STOP_TIMEOUT_S)
        self._thread = None
        if thread is not None and thread.is_alive():
            raise BrokerError(
                f"the broker did not stop within {_STOP_TIMEOUT_S:.0f} s: a task of its loop "
                "ignores cancellation (a bug: report it with the log); where it waits:\n"
                + _where_it_waits(self._loop)
            )

    def __enter__(self) -> BrokerServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


#: The interpreter's thread switch interval in a broker process (:func:`tune_garbage_collector`).
SWITCH_INTERVAL_S = 0.0005


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic-GC passes for a long-running server process, and a shorter
    thread switch interval.

    amqtt allocates many short-lived objects per message (tasks, futures, packets), so the
    default gen-0 threshold (700) runs a collection every few messages; everything loaded at
    start (modules, CA, settings) is moved out of the collector's sight with ``gc.freeze``.
    Reference counting still frees almost everything at once; only cycles wait longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    # A worker thread running Python (a merge of the revoked set, a metrics scrape) keeps
    # the GIL up to the switch interval each time the loop's thread gives it up for a
    # system call: 5 ms by default, paid several times per packet. 0.5 ms keeps the loop's
    # waits short; the worker's work takes a little longer.
    sys.setswitchinterval(SWITCH_INTERVAL_S)


async def serve(settings: BrokerSettings, ready_file: os.PathLike[str] | None = None) -> None:
    """Run a broker until cancelled; write ``ready_file`` once listening."""
    # Before the start: its full collection (tens of ms over every module's objects) would
    # otherwise hold the connections the listener has just taken.
    tune_garbage_collector()
    app = BrokerApp(settings)
    await app.start()
    try:
        host = parse_address(settings.broker_addr).host
        ready: dict[str, Any] = {"addr": str(Address(host, app.port)), "pid": os.getpid()}
        if app.metrics_port is not None:
            metrics_host = parse_address(settings.broker_metrics_addr or "127.0.0.1:0").host
            ready["metrics_url"] = f"http://{Address(metrics_host, app.metrics_port)}/metrics"
        if ready_file is not None:
            write_public(Path(ready_file), json.dumps(ready).encode())
        print(f"broker listening on {ready['addr']}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await app.stop()
