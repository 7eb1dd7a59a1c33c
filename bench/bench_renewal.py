"""Benchmark: certificate renewal over MQTT (registry side), and the renewer alone.

    flock /tmp/certfleet-bench.lock .venv/bin/python bench/bench_renewal.py --burst 1000

Everything in one process (our broker and the registry each in their own thread, a paho
device on its own network thread), SQLite: the figures are conservative, since the three
share one GIL. The rate limit is off (``registry_renewal_min_interval_s=0``) so one device
can send many CSRs; each CSR has its own pre-generated key (key generation is the device's
cost, not the registry's).

- round trip: one CSR at a time, publish -> certificate received (p50/p95/p99);
- burst: N CSRs published at once, time until N certificates came back;
- renewer alone: ``CertificateRenewer.renew`` in a loop (checks, signing, SQLite commit).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from sqlmodel import Session

from broker.server import BrokerServer
from broker.settings import BrokerSettings
from factory.ca import CertificateAuthority, write_issued
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind
from registry.certs import parse_device_certificate
from registry.renewal import CertificateRenewer
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.store import audit, devices

DEVICE = "dev-bench"


def _csrs(ca: CertificateAuthority, count: int) -> list[bytes]:
    identity = ca.identity(IdentityKind.DEVICE, DEVICE)
    return [
        build_csr(generate_key(), identity).public_bytes(serialization.Encoding.PEM)
        for _ in range(count)
    ]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Device:
    def __init__(self, layout: DataLayout, port: int) -> None:
        self.answers: list[tuple[float, bytes]] = []
        self.got = threading.Condition()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=DEVICE)
        client.tls_set(
            ca_certs=str(layout.root_cert),
            certfile=str(layout.client_cert(DEVICE)),
            keyfile=str(layout.client_key(DEVICE)),
        )
        client.max_inflight_messages_set(0)
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, *_: object) -> None:
            sock = c.socket()
            if isinstance(sock, socket.socket):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.subscribe(f"devices/{DEVICE}/cert/issued", qos=1)

        client.on_connect = on_connect
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not subscribed.wait(15):
            raise SystemExit("device could not subscribe")
        self.client = client

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.got:
            self.answers.append((time.perf_counter(), bytes(message.payload)))
            self.got.notify_all()

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.got:
            while len(self.answers) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"only {len(self.answers)} of {count} answers")
                self.got.wait(left)

    def send(self, csr: bytes) -> None:
        self.client.publish(f"devices/{DEVICE}/cert/renew", csr, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--renewer", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        layout = DataLayout(Path(tmp))
        ca = CertificateAuthority.init(layout, "fleet.bench")
        for kind, name in ((IdentityKind.SERVICE, "registry"), (IdentityKind.DEVICE, DEVICE)):
            issued = ca.issue_client(ca.identity(kind, name))
            write_issued(issued, layout.client_cert(name), layout.client_key(name))
        server = ca.issue_server("broker", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        write_issued(
            server,
            layout.server_cert("broker"),
            layout.server_key("broker"),
            intermediate=ca.issuing_cert,
        )
        broker_settings = BrokerSettings(
            data_dir=layout.root, broker_addr="127.0.0.1:0", broker_metrics_addr=None
        )
        results: dict[str, object] = {}
        with BrokerServer(broker_settings) as broker:
            settings = RegistrySettings(
                data_dir=layout.root,
                registry_addr="127.0.0.1:0",
                registry_verify_processes=0,
                telemetry_broker_addr=f"127.0.0.1:{broker.port}",
                registry_renewal_min_interval_s=0,
            )
            with RegistryServer(settings) as registry:
                engine = registry.state.engine
                pem = layout.client_cert(DEVICE).read_text()
                parsed = parse_device_certificate(
                    pem, issuing_cert=ca.issuing_cert, trust_domain=ca.trust_domain
                )
                with Session(engine) as session:
                    devices.register_devices(
                        session, [devices.Registration(parsed)], audit.Actor("b")
                    )
                ingest = registry.app.state.telemetry_ingest
                if not ingest.subscribed.wait(15):
                    raise SystemExit("registry did not subscribe")
                device = Device(layout, broker.port)
                try:
                    csrs = _csrs(ca, args.round_trips)
                    latencies = []
                    for index, csr in enumerate(csrs):
                        started = time.perf_counter()
                        device.send(csr)
                        device.wait_for(index + 1, 30)
                        latencies.append((device.answers[index][0] - started) * 1000)
                    results["round_trip_ms"] = {
                        "count": len(latencies),
                        "p50": round(statistics.median(latencies), 2),
                        "p95": round(_percentile(latencies, 0.95), 2),
                        "p99": round(_percentile(latencies, 0.99), 2),
                    }
                    csrs = _csrs(ca, args.burst)
                    done_before = len(device.answers)
                    started = time.perf_counter()
                    for csr in csrs:
                        device.send(csr)
                    device.wait_for(done_before + args.burst, 120)
                    elapsed = device.answers[-1][0] - started
                    certificates = sum(
                        1
                        for _, payload in device.answers[done_before:]
                        if payload.startswith(b"-----BEGIN CERTIFICATE")
                    )
                    results["burst"] = {
                        "csrs": args.burst,
                        "certificates": certificates,
                        "seconds": round(elapsed, 2),
                        "renewals_per_s": round(args.burst / elapsed, 1),
                    }
                finally:
                    device.close()
                renewer = CertificateRenewer(ca, engine, min_interval_s=0)
                csrs = _csrs(ca, args.renewer)
                started = time.perf_counter()
                for csr in csrs:
                    renewer.renew(DEVICE, csr)
                elapsed = time.perf_counter() - started
                results["renewer_alone"] = {
                    "renewals": args.renewer,
                    "seconds": round(elapsed, 2),
                    "renewals_per_s": round(args.renewer / elapsed, 1),
                }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
