"""amqtt behind one door (STYLE.md, "A library's internals behind one door").

Only the adapter modules touch amqtt's insides; every other module of ours, the cluster
included, goes through the broker seam (:mod:`broker.broker_port`, docs/cluster.md). Three
rules, checked on the source (AST) outside the adapter modules:

- amqtt is imported only from its public modules (:data:`PUBLIC_AMQTT`);
- no attribute starting with ``_`` is read on an object other than ``self``, ``cls``,
  ``super()`` or a class of the same module (no other object's private names, amqtt's or
  ours);
- none of amqtt's internal attributes (:data:`AMQTT_INTERNALS`) is read on an object other
  than ``self``/``cls``, nor the broker's session and subscription mappings
  (:data:`BROKER_INTERNALS`) on anything named ``broker``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.source_tree import PACKAGES, ROOT

#: The modules that know amqtt's insides, each item listed in its docstring and pinned by
#: tests/broker/test_amqtt_adapter_pins.py.
ADAPTER_MODULES = frozenset(
    {
        "broker/amqtt_adapter.py",
        "broker/amqtt_cluster_routing.py",
        "broker/amqtt_session.py",
        "broker/amqtt_state.py",
    }
)

#: What of amqtt the rest of the broker may import: the stream adapters our connections
#: implement, its errors, the ACL's ``Action`` and the CONNECT packet the gate parses.
PUBLIC_AMQTT = frozenset({"amqtt.adapters", "amqtt.errors", "amqtt.contexts", "amqtt.mqtt.connect"})

#: amqtt's session, handler and broker internals (a session's state machine and queues, a
#: handler's delivery, the broker's offline sessions and plugins).
AMQTT_INTERNALS = frozenset(
    {
        "transitions",
        "clean_session",
        "is_anonymous",
        "last_disconnect_time",
        "keep_alive",
        "delivered_message_queue",
        "inflight_out",
        "retained_messages",
        "clear_queues",
        "mqtt_publish",
        "create_offline_session",
        "plugins_manager",
        "store_waiters",
    }
)
#: amqtt's broker mappings, read on an object called ``broker`` (our own state values have
#: fields of these names).
BROKER_INTERNALS = frozenset({"sessions", "subscriptions"})

_OWN = frozenset({"self", "cls"})


def _is_own(value: ast.expr, classes: set[str]) -> bool:
    """``self``, ``cls``, ``super()`` or a class defined in the same module."""
    if isinstance(value, ast.Name):
        return value.id in _OWN or value.id in classes
    return (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "super"
    )


def _names_broker(value: ast.expr) -> bool:
    """Whether the object an attribute is read on is called ``broker`` (``broker``,
    ``self.broker``, ``app.broker``...)."""
    if isinstance(value, ast.Name):
        return "broker" in value.id.lower()
    if isinstance(value, ast.Attribute):
        return "broker" in value.attr.lower()
    return False


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module] if node.module and node.level == 0 else []


def _violations(path: Path, label: str) -> list[str]:
    """Every use of amqtt's insides in ``path`` (``label``: how a finding names the file)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for module in _imported(node):
                if module.split(".")[0] == "amqtt" and module not in PUBLIC_AMQTT:
                    found.append(f"{label}:{node.lineno} imports {module}")
        if not isinstance(node, ast.Attribute) or _is_own(node.value, classes):
            continue
        name = node.attr
        private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
        if (
            private
            or name in AMQTT_INTERNALS
            or (name in BROKER_INTERNALS and _names_broker(node.value))
        ):
            found.append(f"{label}:{node.lineno} reads {ast.unparse(node)}")
    return found


def _modules() -> list[tuple[Path, str]]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return [(path, path.relative_to(ROOT).as_posix()) for path in files]


def test_the_adapter_modules_exist() -> None:
    labels = {label for _path, label in _modules()}
    assert labels >= ADAPTER_MODULES


@pytest.mark.parametrize("package", PACKAGES)
def test_only_the_adapter_touches_amqtt_internals(package: str) -> None:
    found = [
        finding
        for path, label in _modules()
        if label.startswith(f"{package}/") and label not in ADAPTER_MODULES
        for finding in _violations(path, label)
    ]
    assert found == []


def test_the_rule_catches_a_planted_offender(tmp_path: Path) -> None:
    offending = tmp_path / "bad.py"
    offending.write_text(
        "from amqtt.session import Session\n"
        "import amqtt.broker\n"
        "from amqtt.errors import MQTTError\n"
        "from amqtt.contexts import Action\n"
        "class Mine:\n"
        "    def go(self, broker, session, handler, state):\n"
        "        self._own = broker._handler_of(session)\n"
        "        Mine._helper()\n"
        "        super()._parent()\n"
        "        session.transitions.state\n"
        "        handler.mqtt_publish('t', b'', 1)\n"
        "        self.broker.subscriptions.get('a/#')\n"
        "        broker.retained_messages.pop('t')\n"
        "        state.sessions\n"
        "        session.__class__\n"
        "        return session.client_id\n"
    )
    assert _violations(offending, "bad.py") == [
        "bad.py:1 imports amqtt.session",
        "bad.py:2 imports amqtt.broker",
        "bad.py:7 reads broker._handler_of",
        "bad.py:10 reads session.transitions",
        "bad.py:11 reads handler.mqtt_publish",
        "bad.py:12 reads self.broker.subscriptions",
        "bad.py:13 reads broker.retained_messages",
    ]


def _crossings(path: Path, forbidden: str) -> list[str]:
    """The imports in ``path`` of a module under ``forbidden`` (a dotted prefix)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        module
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for module in _imported(node)
        if module == forbidden or module.startswith(f"{forbidden}.")
    ]


def test_the_cluster_and_the_adapter_meet_only_at_the_port() -> None:
    """No mutual holding: the cluster imports no adapter module (it holds the
    :class:`~broker.broker_port.BrokerPort`), the adapter nothing of the cluster (it holds
    the :class:`~broker.broker_port.ClusterHooks`)."""
    cluster = sorted((ROOT / "broker" / "cluster").glob("*.py"))
    assert cluster
    adapter_names = [label[: -len(".py")].replace("/", ".") for label in sorted(ADAPTER_MODULES)]
    assert [
        (path.name, module)
        for path in cluster
        for name in adapter_names
        for module in _crossings(path, name)
    ] == []
    assert [
        (label, module)
        for label in sorted(ADAPTER_MODULES)
        for module in _crossings(ROOT / label, "broker.cluster")
    ] == []


def test_the_crossing_rule_catches_a_planted_import(tmp_path: Path) -> None:
    offending = tmp_path / "bad.py"
    offending.write_text(
        "from broker.amqtt_adapter import CertfleetBroker\n"
        "import broker.cluster.durable\n"
        "from broker.broker_port import BrokerPort\n"
        "from broker.clusterx import Y\n"
    )
    assert _crossings(offending, "broker.amqtt_adapter") == ["broker.amqtt_adapter"]
    assert _crossings(offending, "broker.cluster") == ["broker.cluster.durable"]
    assert _crossings(offending, "broker.broker_port") == ["broker.broker_port"]
