"""Benchmark: the broker cluster on NATS JetStream (issue 13). JSON on stdout.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_cluster.py --mode all

Modes (``--mode shared|fanin|durable|kill|memory|all``; ``all`` leaves ``shared`` out):

- ``shared`` (issue 24): shared-subscription throughput with 1, 2 and 4 nodes, publishers
  spread over every node, one ``$share/bench/devices/+/telemetry`` member per node; with
  local preference and without (``--no-shared-prefer-local``), ``--repeat`` runs each
  (medians). With ``--node-cpu C`` every node runs in its own CPU cgroup of C CPUs
  (bench/cpu_cgroups.py, root; skipped visibly otherwise), the clients and nats-server
  outside: one machine per node. JSON: ``shared_two_over_one``, ``shared_four_over_one``,
  ``shared_nolocal_two_over_one``, ``shared_nolocal_four_over_one``, ``lost``.
  ``--clients c``: the members and publishers are Mosquitto's C clients (bench/c_clients.py)
  for every shape, the single node included, so the ratios compare like with like.

- ``fanin`` (``--node-cpu`` as above, the single node under the same quota): QoS 1 fan-in
  to one subscriber (bench_broker_throughput.py's roles), one node alone vs two cluster
  nodes (publishers spread over both, the subscriber on the first):
  msg/s at the subscriber, messages lost, broker CPU per delivered message (utime + stime
  of every broker process from /proc/<pid>/stat; NATS's too, reported apart).
- ``durable``: the same fan-in with a persistent (clean session off) subscriber: ours in
  cluster mode on one and on two nodes (every PUBACK after the JetStream store), ours as
  a single node saving its persistent sessions to disk, vs stock amqtt (non-durable) vs
  Mosquitto with ``persistence true`` (its own config on an ephemeral port, mTLS).
- ``kill``: ``--devices`` devices connected over two nodes sharing one port
  (SO_REUSEPORT); node 1 is SIGKILLed; the seconds until every device it held is connected
  again (to the survivor), and, for a persistent subscriber, the QoS 1 messages
  acknowledged around the kill that never reached it.
- ``memory``: RSS per idle device connection of one cluster node.

The fan-in's and shared mode's clients are bench_broker_throughput.py's (asyncio, one
process per role), or with ``--clients c`` Mosquitto's own C clients (bench/c_clients.py;
``--load mosquitto-clients`` is the old spelling of it). The kill
mode's devices reconnect concurrently (at most 100 handshakes at a time), as a fleet does.

The machine's nats-server (Debian's) is started on an ephemeral port with JetStream in a
temporary folder; nothing listens outside 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_broker_throughput as tput  # noqa: E402
import broker_bench_lib as lib  # noqa: E402
import c_clients  # noqa: E402
import cpu_cgroups  # noqa: E402

from broker.cluster.natsd import LocalNats  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _node_env(nats: LocalNats) -> dict[str, str]:
    return {
        "CERTFLEET_BROKER_CLUSTER_USER": nats.credentials.user,
        "CERTFLEET_BROKER_CLUSTER_PASSWORD": nats.credentials.password,
        "CERTFLEET_BROKER_METRICS_ADDR": "127.0.0.1:0",
    }


def start_nodes(
    layout: lib.DataLayout,
    nats: LocalNats,
    count: int,
    *,
    extra_args: list[str] | None = None,
    node_cpu: float | None = None,
) -> list[lib.BrokerProcess]:
    """``count`` cluster nodes, each on its own ephemeral port (and in its own CPU cgroup
    of ``node_cpu`` CPUs when given)."""
    nodes = [
        lib.start_ours(
            layout,
            extra_env=_node_env(nats),
            extra_args=["--cluster", nats.url, "--node", f"bench-{index + 1}", *(extra_args or [])],
        )
        for index in range(count)
    ]
    if node_cpu is not None:
        for index, node in enumerate(nodes):
            confine(node, f"node-{index + 1}", node_cpu)
    return nodes


_GROUPS: list[cpu_cgroups.CpuGroup] = []


def confine(broker: lib.BrokerProcess, name: str, cpus: float) -> None:
    """Run ``broker`` in its own CPU cgroup of ``cpus`` CPUs (one machine per node)."""
    group = cpu_cgroups.CpuGroup(f"certfleet-bench-{os.getpid()}-{name}", cpus)
    group.add(broker.pid)
    _GROUPS.append(group)


def release_groups() -> None:
    while _GROUPS:
        _GROUPS.pop().remove()


def start_shared_port_nodes(
    layout: lib.DataLayout, nats: LocalNats, count: int
) -> list[lib.BrokerProcess]:
    """``count`` nodes listening on one port with SO_REUSEPORT."""
    port = lib.free_port()
    nodes = []
    for index in range(count):
        args = ["--cluster", nats.url, "--node", f"bench-{index + 1}", "--reuse-port"]
        args += ["--addr", f"127.0.0.1:{port}"]  # start_ours's own --addr 0 comes first
        nodes.append(lib.start_ours(layout, extra_env=_node_env(nats), extra_args=args))
    return nodes


def publisher_blocks(nodes: int, publishers: int) -> list[range]:
    """The devices publishing to each node: an equal block per node, the rest on the last."""
    share = publishers // nodes
    return [
        range(share * i, share * (i + 1) if i < nodes - 1 else publishers) for i in range(nodes)
    ]


def python_publishers(
    layout: lib.DataLayout, ports: list[int], args: argparse.Namespace
) -> list[subprocess.Popen[str]]:
    """tput's publisher role, one process per node, its devices as publisher_blocks says."""
    pubs = []
    for port, block in zip(ports, publisher_blocks(len(ports), args.publishers), strict=True):
        argv = [
            sys.executable, tput.__file__, "--role", "pub", "--data-dir", str(layout.root),
            "--port", str(port), "--first", str(block.start), "--publishers", str(len(block)),
            "--messages", str(args.messages), "--window", str(args.window),
        ]  # fmt: skip
        pubs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=lib.raise_nofile)
        )
    return pubs


def fan_in(
    layout: lib.DataLayout,
    sub_port: int,
    pub_ports: list[int],
    args: argparse.Namespace,
    *,
    persistent: bool = False,
) -> dict[str, Any]:
    """Run tput's subscriber on ``sub_port`` and publishers split over ``pub_ports``
    (``--clients c``: Mosquitto's C clients instead, bench/c_clients.py)."""
    if args.clients == "c":
        result = c_clients.fan_in(
            layout, sub_port, pub_ports, args.publishers, args.messages, persistent=persistent
        )
        return {**result, "lost": result["acked"] - int(result["received_unique"])}
    expected = args.publishers * args.messages
    script = tput.__file__
    sub_argv = [
        sys.executable, script, "--role", "sub", "--data-dir", str(layout.root),
        "--port", str(sub_port), "--expected", str(expected),
    ]  # fmt: skip
    sub = subprocess.Popen(
        sub_argv + (["--persistent"] if persistent else []), stdout=subprocess.PIPE, text=True
    )
    assert sub.stdout is not None
    json.loads(sub.stdout.readline())  # subscribed
    pubs = python_publishers(layout, pub_ports, args)
    acked = sum(json.loads(p.stdout.readline())["acked"] for p in pubs)  # type: ignore[union-attr]
    result = json.loads(sub.stdout.readline())
    for process in (*pubs, sub):
        process.wait(timeout=60)
    return {**result, "acked": acked, "lost": acked - int(result["received_unique"])}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) core-seconds of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / TICKS, total / TICKS


def measured(brokers: list[lib.BrokerProcess], extra_pids: list[int], run: Any) -> dict[str, Any]:
    machine_before = machine_cpu()
    before = [cpu_seconds(b.pid) for b in brokers]
    extra_before = [cpu_seconds(pid) for pid in extra_pids]
    result = dict(run())
    broker_cpu = sum(cpu_seconds(b.pid) - t for b, t in zip(brokers, before, strict=True))
    extra_cpu = sum(cpu_seconds(p) - t for p, t in zip(extra_pids, extra_before, strict=True))
    deliveries = max(int(result.get("deliveries", 0)), 1)
    result["broker_cpu_us_per_msg"] = round(broker_cpu / deliveries * 1e6, 1)
    result["nats_cpu_us_per_msg"] = round(extra_cpu / deliveries * 1e6, 1) if extra_pids else None
    busy, total = (a - b for a, b in zip(machine_cpu(), machine_before, strict=True))
    # Clients, brokers and NATS share the machine's cores: how full it was, and what one
    # delivered message cost all of them together.
    result["machine_busy_fraction"] = round(busy / total, 3) if total else None
    result["machine_cpu_us_per_msg"] = round(busy / deliveries * 1e6, 1)
    return result


def mode_fanin(layout: lib.DataLayout, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"node_cpu": args.node_cpu}
    single = lib.start_ours(layout)
    if args.node_cpu is not None:
        confine(single, "single", args.node_cpu)
    try:
        out["one_node"] = measured(
            [single], [], lambda: fan_in(layout, single.port, [single.port], args)
        )
    finally:
        single.stop()
        release_groups()
    with LocalNats(root / "nats-fanin") as nats:
        assert nats.process is not None
        nodes = start_nodes(layout, nats, 2, node_cpu=args.node_cpu)
        try:
            ports = [n.port for n in nodes]
            out["two_nodes"] = measured(
                nodes, [nats.process.pid], lambda: fan_in(layout, ports[0], ports, args)
            )
        finally:
            for node in nodes:
                node.stop()
            release_groups()
    one = out["one_node"]["msgs_per_s"] or 0
    out["ratio_two_over_one"] = (
        round((out["two_nodes"]["msgs_per_s"] or 0) / one, 2) if one else None
    )
    return out


def mode_durable(layout: lib.DataLayout, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, count in (("ours_cluster_durable", 1), ("ours_cluster_durable_two_nodes", 2)):
        with LocalNats(root / f"nats-durable-{count}") as nats:
            assert nats.process is not None
            nodes = start_nodes(layout, nats, count)
            try:
                ports = [node.port for node in nodes]
                # The persistent subscriber on the first node; publishers spread over all.
                out[name] = measured(
                    nodes,
                    [nats.process.pid],
                    lambda p=ports: fan_in(layout, p[0], p, args, persistent=True),
                )
            finally:
                for node in nodes:
                    node.stop()
    for name, start in (
        # One node, no cluster: persistent sessions and their queue saved to the data
        # folder every second (SIGKILL bound 1 s; Mosquitto's autosave is the same kind).
        ("ours_single_node_persistent", lambda: lib.start_ours(layout)),
        ("stock_amqtt_non_durable", lambda: lib.start_stock(layout)),
        ("mosquitto_persistence", lambda: lib.start_mosquitto(layout, persistence=True)),
    ):
        broker = start()
        try:
            out[name] = measured(
                [broker],
                [],
                lambda b=broker: fan_in(layout, b.port, [b.port], args, persistent=True),
            )
        finally:
            broker.stop()
    stock = out["stock_amqtt_non_durable"]["msgs_per_s"] or 0
    ours = out["ours_cluster_durable"]["msgs_per_s"] or 0
    two = out["ours_cluster_durable_two_nodes"]["msgs_per_s"] or 0
    out["ratio_ours_over_stock"] = round(ours / stock, 2) if stock else None
    out["ratio_two_nodes_over_stock"] = round(two / stock, 2) if stock else None
    single = out["ours_single_node_persistent"]["msgs_per_s"] or 0
    out["ratio_single_node_persistent_over_stock"] = round(single / stock, 2) if stock else None
    return out


async def _hold(layout: lib.DataLayout, port: int, indexes: range) -> dict[int, Any]:
    clients = {}
    for index in indexes:
        clients[index] = await lib.connect_device(layout, port, index)
    return clients


async def _kill_run(
    layout: lib.DataLayout, nodes: list[lib.BrokerProcess], devices: int, timeout: float
) -> dict[str, Any]:
    port = nodes[0].port
    held = await _hold(layout, port, range(devices))
    victim = nodes[0]
    killed = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)
    await asyncio.sleep(0.5)
    dropped = sorted(index for index, client in held.items() if client.closed.done())
    pending = set(dropped)
    # Devices reconnect each on its own, as a fleet does (round 4 reconnected them one after
    # another from one loop, which timed this client's handshakes in series, not the
    # survivor); at most _RECONNECTING handshakes at a time, each device retrying with backoff.
    gate = asyncio.Semaphore(_RECONNECTING)

    async def reconnect(index: int) -> None:
        backoff = 0.1
        while time.monotonic() - killed < timeout:
            async with gate:
                try:
                    held[index] = await lib.connect_device(layout, port, index)
                    pending.discard(index)
                    return
                except (OSError, ConnectionError, TimeoutError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    await asyncio.gather(*(reconnect(index) for index in dropped))
    seconds = time.monotonic() - killed
    for client in held.values():
        if client.transport is not None:
            client.transport.close()
    return {
        "devices": devices,
        "held_by_killed_node": len(dropped),
        "not_reconnected": len(pending),
        "seconds_until_all_reconnected": round(seconds, 2),
    }


#: Device handshakes in flight at once while the killed node's devices come back.
_RECONNECTING = 100


def mode_kill(layout: lib.DataLayout, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    with LocalNats(root / "nats-kill") as nats:
        nodes = start_shared_port_nodes(layout, nats, 2)
        try:
            result = asyncio.run(_kill_run(layout, nodes, args.devices, args.kill_timeout))
        finally:
            for node in nodes:
                node.stop()
    # Messages lost across a node kill are measured by the fault test
    # tests/cluster/test_faults.py (0 acknowledged messages lost); here: reconnect time.
    return result


def mode_memory(layout: lib.DataLayout, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    with LocalNats(root / "nats-memory") as nats:
        nodes = start_nodes(layout, nats, 1)
        node = nodes[0]
        try:
            time.sleep(1.0)
            before = lib.rss_kib(node.pid)

            async def hold() -> int:
                clients = await _hold(layout, node.port, range(args.devices))
                await asyncio.sleep(2.0)
                after = lib.rss_kib(node.pid)
                for client in clients.values():
                    if client.transport is not None:
                        client.transport.close()
                return after

            after = asyncio.run(hold())
        finally:
            node.stop()
    return {
        "devices": args.devices,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_idle_connection": round((after - before) / max(args.devices, 1), 1),
    }


SHARE_FILTER = "$share/bench/devices/+/telemetry"


def shared_fan_in(
    layout: lib.DataLayout, nodes: list[lib.BrokerProcess], args: argparse.Namespace
) -> dict[str, Any]:
    """One shared-group member per node (service ``bench``, instances ``bench/<n>``) and the
    publishers spread over every node; delivered msg/s over all members together.
    ``--clients c``: Mosquitto's C clients (bench/c_clients.py)."""
    ports = [n.port for n in nodes]
    if args.clients == "c":
        urls = [n.metrics_url for n in nodes]
        assert all(urls), "the nodes serve no metrics"
        blocks = publisher_blocks(len(ports), args.publishers)
        return c_clients.shared_fan_in(
            layout,
            ports,
            [url for url in urls if url],
            [port for port, block in zip(ports, blocks, strict=True) for _ in block],
            args.messages,
            share_filter=SHARE_FILTER,
            window=args.window,
        )
    expected = args.publishers * args.messages
    script = tput.__file__
    subs = []
    for index, port in enumerate(ports):
        argv = [
            sys.executable, script, "--role", "sub", "--data-dir", str(layout.root),
            "--port", str(port), "--expected", str(expected), "--filter", SHARE_FILTER,
            "--client-id", f"bench/m{index + 1}", "--idle", "4",
        ]  # fmt: skip
        subs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    for sub in subs:
        assert sub.stdout is not None
        assert json.loads(sub.stdout.readline())["subscribed"] == 1, "shared SUBACK refused"
    time.sleep(1.0)  # every node learns the others' groups (KV watch)
    pubs = python_publishers(layout, ports, args)
    acked = sum(json.loads(p.stdout.readline())["acked"] for p in pubs)  # type: ignore[union-attr]
    results = [json.loads(s.stdout.readline()) for s in subs]  # type: ignore[union-attr]
    for process in (*pubs, *subs):
        process.wait(timeout=60)
    firsts = [r["first_ts"] for r in results if r["first_ts"] is not None]
    lasts = [r["last_ts"] for r in results if r["last_ts"] is not None]
    deliveries = sum(int(r["deliveries"]) for r in results)
    unique = sum(int(r["received_unique"]) for r in results)
    span = max(lasts) - min(firsts) if firsts else 0.0
    return {
        "acked": acked,
        "deliveries": deliveries,
        "duplicates": deliveries - unique,
        "lost": acked - unique,
        "msgs_per_s": round(deliveries / span, 0) if span else None,
        "per_member": [int(r["deliveries"]) for r in results],
        "p99_ms_max": max((r["p99_ms"] or 0) for r in results),
    }


def _shared_run(
    layout: lib.DataLayout, root: Path, args: argparse.Namespace, count: int, prefer: bool
) -> dict[str, Any]:
    flag = "--shared-prefer-local" if prefer else "--no-shared-prefer-local"
    with LocalNats(root / f"nats-shared-{count}-{prefer}-{time.monotonic_ns()}") as nats:
        assert nats.process is not None
        nodes = start_nodes(layout, nats, count, extra_args=[flag], node_cpu=args.node_cpu)
        profilers = (
            [
                _profile(node, f"{args.profile}-{count}-{prefer}-{i + 1}")
                for i, node in enumerate(nodes)
            ]
            if args.profile
            else []
        )
        try:
            result = measured(nodes, [nats.process.pid], lambda: shared_fan_in(layout, nodes, args))
            # How often each node used up its quota: the machine gave it what it may use.
            result["throttled_fraction"] = [g.throttled_fraction() for g in _GROUPS]
            return result
        finally:
            for profiler in profilers:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            for node in nodes:
                node.stop()
            release_groups()


def _profile(node: lib.BrokerProcess, prefix: str) -> subprocess.Popen[bytes]:
    """py-spy (raw, 200 Hz, non-blocking) on one node, into ``<prefix>.txt``."""
    py_spy = Path(sys.executable).parent / "py-spy"
    argv = [str(py_spy), "record", "--pid", str(node.pid), "--format", "raw", "--rate", "200"]
    argv += ["--nonblocking", "-o", f"{prefix}.txt"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def mode_shared(layout: lib.DataLayout, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Shared-group throughput with 1, 2 and 4 nodes, with and without local preference,
    each node in its own CPU cgroup of ``--node-cpu``; medians of ``--repeat`` runs."""
    out: dict[str, Any] = {"node_cpu": args.node_cpu, "repeat": args.repeat}
    out["clients"] = args.clients
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(args.repeat):  # round robin, so outside load hits every shape alike
        for prefer in (True, False):
            for count in (1, 2, 4):
                if count == 1 and not prefer:
                    continue  # one node: nothing to prefer
                name = f"{'shared' if prefer else 'shared_nolocal'}_{count}"
                if args.shapes and name not in args.shapes.split(","):
                    continue
                runs.setdefault(name, []).append(_shared_run(layout, root, args, count, prefer))
                print(json.dumps({name: runs[name][-1]}), file=sys.stderr, flush=True)
    for name, results in runs.items():
        ordered = sorted(results, key=lambda r: float(r["msgs_per_s"] or 0))
        out[name] = {
            **ordered[len(ordered) // 2],
            "all_msgs_per_s": [r["msgs_per_s"] for r in results],
        }
    one = out["shared_1"]["msgs_per_s"] or 0 if "shared_1" in out else 0

    def ratio(name: str) -> float | None:
        return round((out[name]["msgs_per_s"] or 0) / one, 2) if one and name in out else None

    out["shared_two_over_one"] = ratio("shared_2")
    out["shared_four_over_one"] = ratio("shared_4")
    out["shared_nolocal_two_over_one"] = ratio("shared_nolocal_2")
    out["shared_nolocal_four_over_one"] = ratio("shared_nolocal_4")
    out["lost"] = sum(int(r["lost"]) for results in runs.values() for r in results)
    return out


MODES = {
    "shared": mode_shared,
    "fanin": mode_fanin,
    "durable": mode_durable,
    "kill": mode_kill,
    "memory": mode_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=[*MODES, "all"], default="all")
    parser.add_argument("--publishers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--devices", type=int, default=5000, help="kill and memory modes")
    parser.add_argument("--kill-timeout", type=float, default=60.0)
    parser.add_argument(
        "--node-cpu",
        type=float,
        help="fanin, shared: each broker node in its own CPU cgroup of this many CPUs (root)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="shared: runs per shape")
    parser.add_argument(
        "--shapes", help="shared: only these, e.g. shared_1,shared_nolocal_4 (default: all)"
    )
    parser.add_argument("--profile", help="shared: py-spy raw profile of each node to PREFIX-*")
    parser.add_argument(
        "--clients",
        "--load",
        choices=["python", "c", "mosquitto-clients"],
        default="python",
        help="fanin, durable, shared: ours (asyncio, one process per role) or Mosquitto's C"
        " clients (c; mosquitto-clients is its old name)",
    )
    args = parser.parse_args()
    args.clients = "c" if args.clients == "mosquitto-clients" else args.clients
    if args.node_cpu is not None and (why := cpu_cgroups.available()) is not None:
        print(json.dumps({"skipped": f"--node-cpu needs CPU cgroups: {why}"}), flush=True)
        return
    lib.raise_nofile()
    root = lib.tmp_root("certfleet-bench-cluster-")
    layout = lib.make_fleet(root, max(args.publishers + 1, args.devices))
    modes = [m for m in MODES if m != "shared"] if args.mode == "all" else [args.mode]
    report: dict[str, Any] = {"machine": lib.lscpu_model(), "args": vars(args)}
    try:
        for mode in modes:
            report[mode] = MODES[mode](layout, root, args)
            print(json.dumps({mode: report[mode]}), file=sys.stderr, flush=True)
    finally:
        release_groups()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
