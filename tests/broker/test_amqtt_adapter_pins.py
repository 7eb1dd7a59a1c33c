"""Pins: what broker/amqtt_adapter.py relies on inside amqtt, checked against the installed
amqtt. An upgrade that renames, re-signs or changes the meaning of one of these fails here,
by name, before it can make the broker quietly skip its ACL, its routing fixes or its
keep-alive handling. Numbers refer to the items of the adapter's docstring."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import amqtt
import pytest
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import PluginLoadError
from amqtt.mqtt.protocol.handler import ProtocolHandler
from amqtt.session import Session

from broker import amqtt_adapter
from broker.acl import TopicAcl
from broker.amqtt_adapter import AclTopicPlugin, CertfleetBroker, GateAuthPlugin
from broker.auth import AdmissionPolicy
from broker.gate import ConnectGate
from broker.metrics import BrokerMetrics
from fleetcore.topics import topic_matches
from tests.support.pki import TRUST_DOMAIN


class _NothingRevoked:
    def is_serial_revoked(self, serial: str) -> bool:
        return False

    def is_device_decommissioned(self, device_id: str) -> bool:
        return False


def _gate() -> ConnectGate:
    return ConnectGate(AdmissionPolicy(TRUST_DOMAIN, _NothingRevoked()), BrokerMetrics())


def _on_loop(build: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(build())


def _parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def _calls(owner: Callable[..., Any], needle: str) -> bool:
    return needle in inspect.getsource(owner)


def test_amqtt_is_the_pinned_minor_version() -> None:
    assert amqtt.__version__.startswith("0.12."), amqtt.__version__


# -- 1. Broker._topic_filtering -----------------------------------------------------------


def test_topic_filtering_keeps_its_signature_and_is_asked_on_every_path() -> None:
    assert inspect.iscoroutinefunction(Broker._topic_filtering)
    assert _parameters(Broker._topic_filtering) == ["self", "session", "topic", "action"]
    # PUBLISH from a client, each SUBSCRIBE filter, each routed copy (RECEIVE).
    assert _calls(Broker._handle_message_delivery, "self._topic_filtering(")
    assert _calls(Broker.add_subscription, "self._topic_filtering(")
    assert _calls(Broker._run_broadcast, "action=Action.RECEIVE")


def test_the_override_answers_with_the_acl_and_the_plugin_path_agrees() -> None:
    decisions: list[tuple[Action, bool]] = []
    acl = TopicAcl(TRUST_DOMAIN, count=lambda action, allowed: decisions.append((action, allowed)))

    async def check() -> tuple[bool, bool, bool | None]:
        broker = CertfleetBroker(gate=_gate(), acl=acl)
        session = Session()
        session.client_id = "dev-1"
        own = await broker._topic_filtering(session, "devices/dev-1/telemetry", Action.PUBLISH)
        other = await broker._topic_filtering(session, "devices/dev-2/telemetry", Action.PUBLISH)
        # The fallback: amqtt's own implementation, through the registered plugin.
        fallback = await Broker._topic_filtering(
            broker, session, "devices/dev-2/telemetry", Action.PUBLISH
        )
        return own, other, fallback

    own, other, fallback = _on_loop(check)
    assert (own, other, fallback) == (True, False, False)
    assert decisions == [(Action.PUBLISH, True), (Action.PUBLISH, False), (Action.PUBLISH, False)]


# -- 2. Broker._broadcast_loop and what it uses -------------------------------------------


def test_broadcast_loop_is_started_by_start_and_its_state_has_the_shapes_we_use() -> None:
    assert inspect.iscoroutinefunction(Broker._broadcast_loop)
    assert _parameters(Broker._broadcast_loop) == ["self"]
    assert _calls(Broker.start, "self._broadcast_loop()")
    assert _parameters(Broker._run_broadcast) == ["self", "running_tasks"]

    async def shapes() -> tuple[object, object, object]:
        broker = CertfleetBroker(gate=_gate(), acl=TopicAcl(TRUST_DOMAIN))
        return broker._broadcast_queue, broker._tasks_queue, broker._broadcast_shutdown_waiter

    queue, tasks, waiter = _on_loop(shapes)
    assert isinstance(queue, asyncio.Queue)
    assert isinstance(tasks, deque)
    assert isinstance(waiter, asyncio.Future)


def test_run_broadcast_takes_exactly_one_queued_message() -> None:
    async def run() -> tuple[int, int]:
        broker = CertfleetBroker(gate=_gate(), acl=TopicAcl(TRUST_DOMAIN))
        for n in range(2):
            await broker.internal_message_broadcast("devices/d/telemetry", str(n).encode(), 1)
        before = broker._broadcast_queue.qsize()
        await broker._run_broadcast(deque())
        return before, broker._broadcast_queue.qsize()

    assert _on_loop(run) == (2, 1)


def test_shutdown_sets_the_waiter_our_loop_watches() -> None:
    assert _calls(Broker._shutdown_broadcast_loop, "self._broadcast_shutdown_waiter.set_result")


# -- 3, 4. Retained-message paths ---------------------------------------------------------


def test_retained_message_hooks_keep_their_signatures_and_call_sites() -> None:
    assert _parameters(Broker._publish_session_retained_messages) == ["self", "session"]
    assert _parameters(Broker._publish_retained_messages_for_subscription) == [
        "self",
        "subscription",
        "session",
    ]
    assert _calls(Broker._handle_client_session, "self._publish_session_retained_messages(")
    # At CONNECT amqtt asks for every filter of the broker (why ours checks the session's own).
    assert _calls(Broker._handle_client_session, "for topic in self._subscriptions")
    assert _calls(Broker._handle_subscription, "self._publish_retained_messages_for_subscription(")


def test_offline_messages_are_queued_on_the_session_retained_messages_queue() -> None:
    assert _calls(Broker._run_broadcast, "self._retain_broadcast_message(")
    assert _calls(Broker._retain_broadcast_message, "target_session.retained_messages.put(")
    assert isinstance(Session().retained_messages, asyncio.Queue)


def test_our_topic_matching_equals_amqtts() -> None:
    cases = [
        ("devices/d/telemetry", "devices/+/telemetry"),
        ("devices/d/telemetry", "devices/#"),
        ("devices/d/telemetry", "#"),
        ("devices/d", "devices/+/telemetry"),
        ("devices/d/cert/renew", "devices/+/telemetry"),
        ("devices/d/cert/renew", "devices/d/#"),
        ("$SYS/x", "#"),
        ("$SYS/x", "+/x"),
        ("$SYS/x", "$SYS/#"),
        ("a/b", "a/b"),
        ("a/b", "a/b/c"),
        ("a/b", "a/b#"),
        ("a/b", "a/+b"),
        ("a", "a/#"),
    ]

    async def amqtts() -> list[bool]:
        broker = Broker()
        return [broker._matches(topic, topic_filter) for topic, topic_filter in cases]

    assert [topic_matches(t, f) for t, f in cases] == _on_loop(amqtts)


# -- 5, 6. Session fields -----------------------------------------------------------------


def test_the_handler_reads_keep_alive_when_its_reader_starts() -> None:
    source = inspect.getsource(ProtocolHandler._reader_loop)
    assert "self.session.keep_alive" in source
    assert "asyncio.wait_for" in source
    # ...which is after authentication: our auth plugin sets it to 0 in time.
    handle = inspect.getsource(Broker._handle_client_session)
    assert handle.index("self._authenticate(") < handle.index("handler.start()")


def test_incoming_publishes_wait_on_delivered_message_queue_before_routing() -> None:
    assert isinstance(Session().delivered_message_queue, asyncio.Queue)
    assert _calls(ProtocolHandler, "self.session.delivered_message_queue.put(")
    assert _calls(ProtocolHandler.mqtt_deliver_next_message, "delivered_message_queue.get()")


def test_the_client_message_loop_ends_at_the_disconnect_and_is_the_session_s_last_step() -> None:
    assert _parameters(Broker._client_message_loop) == ["self", "client_session", "handler"]
    loop = inspect.getsource(Broker._client_message_loop)
    assert "self._handle_disconnect(" in loop and "connected = False" in loop
    assert "handler.mqtt_deliver_next_message()" in loop
    # Ours routes what the loop left queued after it returns: nothing follows it in amqtt.
    handle = inspect.getsource(Broker._handle_client_session).rstrip()
    assert handle.endswith("await self._client_message_loop(client_session, handler)")
    # What is queued is taken when the disconnect is handled, before amqtt's first await...
    assert _parameters(Broker._handle_disconnect) == [
        "self", "client_session", "handler", "disconnect_waiter",
    ]  # fmt: skip
    # ...because the session monitor empties a disconnected clean session's queues.
    monitor = inspect.getsource(Broker._session_monitor)
    assert "clean_session" in monitor and "self._cleanup_session(" in monitor
    assert _calls(Broker._cleanup_session, "session.clear_queues()")
    assert _calls(Session.clear_queues, "delivered_message_queue.get_nowait()")


def test_the_client_loop_takes_one_publish_per_pass_and_queues_what_else_the_client_sent() -> None:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    loop = inspect.getsource(Broker._client_message_loop)
    assert "asyncio.ensure_future(handler.mqtt_deliver_next_message())" in loop
    assert "asyncio.wait(" in loop
    assert "self._handle_message_delivery(client_session, handler, wait_deliver)" in loop

    async def queues() -> tuple[object, object]:
        handler = BrokerProtocolHandler(Broker().plugins_manager)
        return handler._pending_subscriptions, handler._pending_unsubscriptions

    subscriptions, unsubscriptions = _on_loop(queues)
    assert isinstance(subscriptions, asyncio.Queue) and isinstance(unsubscriptions, asyncio.Queue)
    assert _calls(BrokerProtocolHandler.get_next_pending_subscription, "_pending_subscriptions")
    assert _calls(BrokerProtocolHandler.get_next_pending_unsubscription, "_pending_unsubscriptions")


# -- Plugins wired through their Config dataclass -----------------------------------------


def test_plugins_get_their_collaborators_from_their_config() -> None:
    gate, acl = _gate(), TopicAcl(TRUST_DOMAIN)

    async def build() -> tuple[object, object]:
        broker = CertfleetBroker(gate=gate, acl=acl)
        auth = broker.plugins_manager.get_plugin(GateAuthPlugin.__name__)
        topic = broker.plugins_manager.get_plugin(AclTopicPlugin.__name__)
        assert isinstance(auth, GateAuthPlugin) and isinstance(topic, AclTopicPlugin)
        return auth._gate, topic._acl

    assert _on_loop(build) == (gate, acl)


def test_an_unwired_plugin_cannot_be_built() -> None:
    async def build() -> None:
        Broker({"plugins": {f"{amqtt_adapter.__name__}.GateAuthPlugin": {}}})

    with pytest.raises(PluginLoadError):
        _on_loop(build)


def test_a_session_of_no_admitted_connection_is_refused() -> None:
    async def authenticate() -> bool | None:
        broker = CertfleetBroker(gate=_gate(), acl=TopicAcl(TRUST_DOMAIN))
        session = Session()
        session.client_id = "dev-1"
        return bool(await broker._authenticate(session, None))

    assert _on_loop(authenticate) is False


# -- 7-9. Persistent state ----------------------------------------------------------------


def test_inflight_out_holds_sent_unacknowledged_messages_and_is_dropped_at_the_end() -> None:
    assert isinstance(Session().inflight_out, dict)
    flow = inspect.getsource(ProtocolHandler._handle_qos1_message_flow)
    assert "self.session.inflight_out[app_message.packet_id] = app_message" in flow
    # ...and forgotten however the wait ends (why we capture it before a shutdown).
    assert "finally:" in flow and "self.session.inflight_out.pop(" in flow


def test_which_sessions_amqtt_queues_for_and_expires() -> None:
    run = inspect.getsource(Broker._run_broadcast)
    assert 'target_session.transitions.state != "connected"' in run
    assert "not target_session.clean_session" in run
    assert "not target_session.is_anonymous" in run
    monitor = inspect.getsource(Broker._session_monitor)
    assert "session.last_disconnect_time < retain_after" in monitor
    assert "session.is_anonymous or session.clean_session" in monitor


def test_the_expiry_monitor_is_started_by_start_and_ours_hands_the_loop_back_between_slices() -> (
    None
):
    """Item 18: amqtt's start runs ``_session_monitor``; ours removes what amqtt's rules
    remove (clean and expired persistent sessions, disconnected), keeps the rest, and lets
    other tasks run between slices of :data:`MONITOR_SLICE` sessions."""
    assert _calls(Broker.start, "self._session_monitor()")
    assert _parameters(Broker._session_monitor) == ["self"]
    assert CertfleetBroker._session_monitor is not Broker._session_monitor

    async def scenario() -> tuple[int, set[str], int]:
        broker = CertfleetBroker(gate=_gate(), acl=TopicAcl(TRUST_DOMAIN))
        expiry = broker.config.session_expiry_interval
        assert expiry
        kinds = {f"kept-{i}": "kept" for i in range(20 * amqtt_adapter.MONITOR_SLICE)}
        kinds |= {"clean-1": "clean", "anon-1": "anonymous", "old-1": "expired"}
        for client_id, kind in kinds.items():
            handler, session = broker.create_offline_session(client_id)
            session.clean_session = kind == "clean"
            session.is_anonymous = kind == "anonymous"
            if kind == "expired":
                session.last_disconnect_time = int(time.time() - 2 * expiry)
            broker._sessions[client_id] = (session, handler)
        turns = 0

        async def other() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        runner, monitor = (
            asyncio.create_task(other()),
            asyncio.create_task(broker._session_monitor()),
        )
        for _ in range(100_000):  # bounded: the pass ends within a few hundred turns
            await asyncio.sleep(0)
            if "old-1" not in broker._sessions:
                break
        seen = turns
        for task in (runner, monitor):
            task.cancel()
        await asyncio.gather(runner, monitor, return_exceptions=True)
        return seen, set(broker._sessions), len(kinds)

    turns, left, total = _on_loop(scenario)
    assert left == {f"kept-{i}" for i in range(20 * amqtt_adapter.MONITOR_SLICE)}, total - len(left)
    assert turns >= 19  # the loop ran other work between the 20 slices of one pass


def test_an_offline_session_from_create_offline_session_is_disconnected() -> None:
    async def create() -> tuple[str, str | None, object]:
        broker = Broker()
        _handler, session = broker.create_offline_session("dev-1")
        return session.transitions.state, session.client_id, session.last_disconnect_time

    state, client_id, disconnected_at = _on_loop(create)
    assert (state, client_id) == ("disconnected", "dev-1")
    assert isinstance(disconnected_at, int)


def test_the_sessions_property_is_the_broker_s_own_mapping() -> None:
    async def same() -> bool:
        broker = Broker()
        return broker.sessions is broker._sessions and broker.subscriptions is broker._subscriptions

    assert _on_loop(same)


def test_accepted_messages_go_from_the_session_queue_to_the_broadcast_queue() -> None:
    assert _calls(Broker._handle_message_delivery, "await self._broadcast_message(")
    assert _calls(Broker._broadcast_message, "await self._broadcast_queue.put(")


# -- 10-14. cluster mode (broker/cluster) ---------------------------------------------------


def test_cluster_hooks_wrap_amqtt_methods_with_the_signatures_they_expect() -> None:
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    assert _parameters(Broker._initialize_client_session) == [
        "self", "reader", "writer", "remote_address", "remote_port",
    ]  # fmt: skip
    assert _calls(Broker._initialize_client_session, "BrokerProtocolHandler.init_from_connect")
    assert _parameters(Broker._handle_message_delivery) == [
        "self", "client_session", "handler", "wait_deliver",
    ]  # fmt: skip
    assert _calls(Broker._handle_message_delivery, "self._broadcast_message(")
    assert _parameters(Broker._broadcast_message) == [
        "self", "session", "topic", "data", "force_qos",
    ]  # fmt: skip
    assert _parameters(Broker.add_subscription) == ["self", "subscription", "session"]
    assert _parameters(Broker._del_subscription) == ["self", "a_filter", "session"]
    assert _parameters(Broker._run_broadcast) == ["self", "running_tasks"]
    flow = BrokerProtocolHandler._handle_qos1_message_flow
    assert _parameters(flow) == ["self", "app_message"]
    # Incoming QoS 1: amqtt queues the message, then sends the PUBACK (what the swap delays).
    source = inspect.getsource(flow)
    assert source.index("delivered_message_queue.put") < source.index("PubackPacket.build")


def test_the_retained_store_is_the_broker_s_own_mapping_of_retained_messages() -> None:
    """Item 15: a cluster node puts the cluster's retained messages into this mapping
    (``ClusterBroker.put_retained``), as amqtt's own ``retain_message`` does."""
    from amqtt.broker import RetainedApplicationMessage

    async def stored() -> tuple[bool, object, tuple[object, object, object]]:
        broker = Broker()
        await broker.retain_message(None, "a/b", b"x", 1)
        message = broker.retained_messages["a/b"]
        same = broker.retained_messages is broker._retained_messages
        return same, type(message), (message.topic, message.data, message.qos)

    same, kind, fields = _on_loop(stored)
    assert same and kind is RetainedApplicationMessage and fields == ("a/b", b"x", 1)
    assert _parameters(RetainedApplicationMessage.__init__) == [
        "self", "source_session", "topic", "data", "qos",
    ]  # fmt: skip


# -- 17. shared subscriptions (broker/shared_subscriptions.py) -------------------------------


def test_a_clean_session_connect_deletes_the_old_session_and_empties_its_queue() -> None:
    # CertfleetBroker._delete_session routes what the old session had queued first.
    assert _parameters(Broker._delete_session) == ["self", "client_id"]
    assert _calls(Broker._delete_session, "session.clear_queues()")
    assert "await self._delete_session(client_session.client_id)" in inspect.getsource(
        Broker._initialize_client_session
    )
    assert "delivered_message_queue.get_nowait()" in inspect.getsource(Session.clear_queues)


def test_amqtt_deletes_a_session_s_subscriptions_through_del_all_subscriptions() -> None:
    assert _parameters(Broker._del_all_subscriptions) == ["self", "session"]
    assert _calls(Broker._delete_session, "self._del_all_subscriptions(session)")
    assert _calls(Broker._cleanup_session, "self._del_all_subscriptions(session)")
    # A $share UNSUBSCRIBE reaches _del_subscription, a SUBSCRIBE add_subscription.
    assert _calls(Broker._handle_unsubscription, "self._del_subscription(topic, client_session)")
    assert _calls(Broker._handle_subscription, "await self.add_subscription(subscription")


def test_a_closed_connection_cancels_the_puback_waits_and_a_slow_client_times_out() -> None:
    # What hands a shared message to another member: mqtt_publish ends with CancelledError
    # when the handler stops, and with TimeoutError after 5 s without a PUBACK.
    assert _calls(ProtocolHandler.stop, "self._stop_waiters()")
    assert _calls(ProtocolHandler._stop_waiters, "self._puback_waiters.values()")
    assert _calls(ProtocolHandler._stop_waiters, "waiter.cancel()")
    flow = inspect.getsource(ProtocolHandler._handle_qos1_message_flow)
    assert "asyncio.wait_for(waiter, timeout=5)" in flow and "raise TimeoutError(" in flow
    assert _calls(ProtocolHandler.mqtt_publish, "await self._handle_message_flow(message)")


def test_the_broker_keeps_delivery_tasks_in_tasks_queue() -> None:
    async def shape() -> bool:
        return isinstance(Broker()._tasks_queue, deque)

    assert _on_loop(shape)
    assert _calls(Broker._broadcast_loop, "self._tasks_queue")
