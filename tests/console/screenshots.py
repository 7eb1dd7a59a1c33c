"""Screenshots of every console page into a folder (docs/console by default).

    .venv/bin/python -m tests.console.screenshots [docs/console]

A fresh CA and a registry on 127.0.0.1:0 in a temporary folder, seeded with 2,000 devices of
staggered expiry, telemetry and a few decommissions, photographed in headless Chromium at a
laptop's 1280x800.
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import Session

from factory.ca import CertificateAuthority
from fleetcore.keys import build_csr, generate_key
from fleetcore.layout import DataLayout
from fleetcore.profile import Identity, IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.store import telemetry
from tests.console.chromium import chromium
from tests.console.conftest import make_token

DEVICES = 2_000
#: A device left on a shelf past its not_after, for the re-enrollment pages.
EXPIRED_ID = "dev-shelf-01"


def seed(server: RegistryServer, ca: CertificateAuthority, token: str, root: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    certificates = [
        ca.issue_client(
            ca.identity(IdentityKind.DEVICE, f"dev-{i:06d}"),
            not_after=now + dt.timedelta(days=5) + dt.timedelta(days=200) * i / DEVICES,
        )
        for i in range(DEVICES)
    ]
    with httpx.Client(
        base_url=f"{server.url}/api/v1",
        verify=str(root),
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    ) as api:
        for start in range(0, DEVICES, 1000):
            batch = [
                {
                    "certificate_pem": c.certificate_pem.decode(),
                    "hardware_serial": f"HW-{start + i:06d}",
                }
                for i, c in enumerate(certificates[start : start + 1000])
            ]
            api.post("/devices/batch", json={"devices": batch}).raise_for_status()
        with Session(server.state.engine) as session:
            telemetry.record_telemetry(
                session,
                [
                    telemetry.TelemetryUpdate(
                        f"dev-{i:06d}",
                        now - dt.timedelta(seconds=i % 90),
                        {"device_id": f"dev-{i:06d}", "temp_c": 20 + i % 7, "battery": 0.91},
                    )
                    for i in range(0, 1500)
                ],
            )
        expired = ca.issue_client(
            ca.identity(IdentityKind.DEVICE, EXPIRED_ID),
            not_before=now - dt.timedelta(days=400),
            not_after=now - dt.timedelta(days=3),
        )
        api.post(
            "/devices", json={"certificate_pem": expired.certificate_pem.decode()}
        ).raise_for_status()
        for device_id, reason, code in (
            ("dev-000013", "stolen from site 4", "keyCompromise"),
            ("dev-000421", "replaced by a new unit", "superseded"),
            ("dev-001200", "<b>end of life</b> (shown as text)", "cessationOfOperation"),
        ):
            api.post(
                f"/devices/{device_id}/decommission", json={"reason": reason, "reason_code": code}
            ).raise_for_status()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        layout = DataLayout(Path(folder))
        ca = CertificateAuthority.init(layout, "fleet.local")
        settings = RegistrySettings(
            data_dir=layout.root, registry_addr="127.0.0.1:0", telemetry_broker_addr=None
        )
        with RegistryServer(settings) as server:
            token = make_token(server, "alice")
            seed(server, ca, token, layout.root_cert)
            with chromium(layout.server_cert(settings.registry_tls_name)) as browser:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(15_000)

                def shot(name: str) -> None:
                    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
                    print(out / f"{name}.png")

                page.goto(f"{server.url}/ui/")
                shot("sign-in")
                page.get_by_label("Operator token").fill(token)
                page.get_by_role("button", name="Sign in", exact=True).click()
                page.get_by_role("heading", name="Fleet").wait_for()
                shot("fleet")
                page.get_by_role("link", name="Devices").click()
                page.get_by_label("Search devices").fill("dev-00042")
                page.get_by_role("button", name="Search").click()
                page.locator("#devices").wait_for()
                shot("devices")
                page.goto(f"{server.url}/ui/devices/dev-000420")
                shot("device")
                page.get_by_role("button", name="Decommission", exact=True).click()
                page.get_by_label("Reason", exact=True).fill("lost in transit")
                shot("decommission")
                page.get_by_role("button", name="Decommission device").click()
                page.get_by_role("status").wait_for()
                shot("decommissioned")
                page.goto(f"{server.url}/ui/devices/{EXPIRED_ID}")
                page.get_by_role("button", name="Re-enroll", exact=True).click()
                csr = build_csr(generate_key(), Identity.device("fleet.local", EXPIRED_ID))
                page.get_by_label("CSR (PEM)").fill(csr.public_bytes(Encoding.PEM).decode())
                shot("reenroll")
                page.get_by_role("button", name="Re-enroll device").click()
                page.get_by_role("status").wait_for()
                shot("reenrolled")
                page.goto(f"{server.url}/docs")
                page.get_by_role("button", name="Authorize").click()
                page.get_by_text("mutualTLS").first.wait_for()
                page.screenshot(path=str(out / "docs.png"))  # the dialog covers the viewport
                print(out / "docs.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console"))
