"""The console in a real headless Chromium: an operator signs in, finds a device, decommissions
it through the page, and the real broker drops the device's live paho session. Refusals (a
wrong token, a form without its CSRF token) and escaping are checked as the browser shows them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker.server import BrokerServer
from factory.ca import write_issued
from fleetcore.clock import utcnow
from fleetcore.keys import build_csr, generate_key
from fleetcore.profile import Identity, IdentityKind
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from tests.console.chromium import chromium, missing_reason
from tests.console.conftest import make_token
from tests.support.mqtt import connect
from tests.support.pki import TestPKI, issue_device
from tests.support.servers import broker_settings, feed_broker_layout
from tests.support.tls import tls_context

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))

TIMEOUT_MS = 15_000


@pytest.fixture
def served(pki: TestPKI, tmp_path: Path) -> Iterator[RegistryServer]:
    settings = RegistrySettings(
        data_dir=pki.layout.root,
        registry_addr="127.0.0.1:0",
        registry_database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        registry_feed_poll_seconds=0.2,
        telemetry_broker_addr=None,
    )
    with RegistryServer(settings) as server:
        yield server


@pytest.fixture
def browser(pki: TestPKI, served: RegistryServer) -> Iterator[Browser]:
    server_cert = pki.layout.server_cert(served.settings.registry_tls_name)
    with chromium(server_cert, root_ca=pki.layout.root_cert) as launched:
        yield launched


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def operator_api(pki: TestPKI, served: RegistryServer) -> Iterator[httpx.Client]:
    files = pki.client(IdentityKind.OPERATOR, "alice")
    with httpx.Client(
        base_url=f"{served.url}/api/v1", verify=tls_context(pki, files), timeout=30
    ) as client:
        yield client


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/ui/")
    assert page.url.startswith(f"{url}/ui/sign-in")
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("heading", name="Fleet").wait_for()


def test_operator_decommissions_a_device_and_the_broker_drops_it(
    pki: TestPKI,
    served: RegistryServer,
    page: Page,
    operator_api: httpx.Client,
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    device_id = "dev-browser-1"
    files = issue_device(pki, tmp_path, device_id)
    other = issue_device(pki, tmp_path, "dev-browser-2")
    for registered in (files, other):
        response = operator_api.post(
            "/devices", json={"certificate_pem": registered.cert.read_text()}
        )
        assert response.status_code == 201, response.text
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    settings = broker_settings(layout, registry_url=served.url, broker_feed_wait_s=30)
    with BrokerServer(settings) as broker:
        device = connect(broker.port, files, device_id)
        bystander = connect(broker.port, other, "dev-browser-2")
        try:
            assert device.connected.is_set(), device.reason
            assert bystander.connected.is_set(), bystander.reason

            sign_in(page, served.url, make_token(served))
            page.get_by_role("link", name="Devices").click()
            page.get_by_label("Search devices").fill("dev-browser-1")
            page.get_by_role("button", name="Search").click()
            expect(page.locator("#devices tbody tr")).to_have_count(1)
            page.get_by_role("link", name=device_id).click()
            expect(page.get_by_role("heading", level=1)).to_have_text(device_id)
            expect(page.locator("#device-status")).to_have_text("active")

            page.get_by_role("button", name="Decommission", exact=True).click()
            reason = '<img src=x onerror="document.title=1"> stolen from <b>site 4</b>'
            page.get_by_label("Reason", exact=True).fill(reason)
            page.get_by_label("Reason code (RFC 5280)").select_option("keyCompromise")
            page.get_by_role("button", name="Decommission device").click()

            expect(page.get_by_role("status")).to_contain_text(f"{device_id} decommissioned")
            expect(page.locator("#device-status")).to_have_text("decommissioned")
            # Post/Redirect/Get: the outcome is a page of its own; reloading it posts nothing.
            assert "?decommissioned=" in page.url, page.url
            page.reload()
            expect(page.get_by_role("status")).to_contain_text(f"{device_id} decommissioned")
            events = operator_api.get("/revocations", params={"after": 0}).json()["events"]
            assert [e["device_id"] for e in events].count(device_id) == 1
            expect(page.locator("#certificates .reason").first).to_have_text(
                f"{reason} (keyCompromise)"
            )
            assert page.locator("main img, main b").count() == 0  # shown as text, not markup
            assert page.title() == f"{device_id} · certfleet"

            assert device.disconnected.wait(10), "the broker did not drop the device's session"
            assert not bystander.disconnected.is_set()
        finally:
            device.close()
            bystander.close()
    assert operator_api.get(f"/devices/{device_id}").json()["status"] == "decommissioned"


def test_wrong_token_is_refused_in_the_browser(served: RegistryServer, page: Page) -> None:
    from playwright.sync_api import expect

    page.goto(f"{served.url}/ui/sign-in")
    page.get_by_label("Operator token").fill("cfr_wrong")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_role("alert")).to_have_text(
        "That operator token is unknown or revoked. Check it, or create one with "
        "'certfleet registry token create --operator NAME'."
    )
    page.goto(f"{served.url}/ui/devices")
    assert page.url.startswith(f"{served.url}/ui/sign-in")


def test_form_without_its_csrf_token_is_refused_in_the_browser(
    served: RegistryServer, page: Page, operator_api: httpx.Client, pki: TestPKI, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    files = issue_device(pki, tmp_path, "dev-browser-3")
    operator_api.post("/devices", json={"certificate_pem": files.cert.read_text()})
    sign_in(page, served.url, make_token(served))
    page.goto(f"{served.url}/ui/devices/dev-browser-3/decommission")
    page.get_by_label("Reason", exact=True).fill("stolen")
    page.locator('input[name="csrf_token"]').evaluate_all(
        "(inputs) => inputs.forEach(i => i.remove())"
    )
    page.get_by_role("button", name="Decommission device").click()
    expect(page.get_by_role("alert")).to_contain_text(
        "the form's security token (CSRF) is missing or out of date"
    )
    assert operator_api.get("/devices/dev-browser-3").json()["status"] == "active"


def test_fleet_page_updates_by_itself_and_sign_out_ends_it(
    served: RegistryServer, page: Page, operator_api: httpx.Client, pki: TestPKI, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    files = issue_device(pki, tmp_path, "dev-browser-4")
    operator_api.post("/devices", json={"certificate_pem": files.cert.read_text()})
    sign_in(page, served.url, make_token(served))
    expect(page.locator("#count-decommissioned")).to_have_text("0")
    response = operator_api.post(
        "/devices/dev-browser-4/decommission", json={"reason": "<i>eol</i>"}
    )
    assert response.status_code == 200
    # No reload: console.js fetches the live block again every 5 s.
    expect(page.locator("#count-decommissioned")).to_have_text("1", timeout=TIMEOUT_MS)
    expect(page.locator("#revocations .reason")).to_have_text("<i>eol</i> (cessationOfOperation)")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_have_text("Signed out.")
    page.goto(f"{served.url}/ui/")
    assert page.url.startswith(f"{served.url}/ui/sign-in")


def test_docs_page_renders_from_local_assets_with_authorize(
    served: RegistryServer, page: Page
) -> None:
    from playwright.sync_api import expect

    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{served.url}/docs")
    expect(page.get_by_role("button", name="Authorize")).to_be_visible()
    page.get_by_role("button", name="Authorize").click()
    expect(page.get_by_text("bearerAuth")).to_be_visible()
    expect(page.get_by_text("mutualTLS")).to_be_visible()
    assert requested and all(url.startswith(served.url) for url in requested)


def _certificate_page(browser: Browser, pki: TestPKI, url: str, kind: IdentityKind) -> Page:
    files = pki.client(kind, f"browser-{kind.value}")
    context = browser.new_context(
        client_certificates=[
            {"origin": url, "certPath": str(files.cert), "keyPath": str(files.key)}
        ]
    )
    context.set_default_timeout(TIMEOUT_MS)
    return context.new_page()


def test_operator_certificate_signs_in_in_the_browser(
    browser: Browser, pki: TestPKI, served: RegistryServer
) -> None:
    from playwright.sync_api import expect

    page = _certificate_page(browser, pki, served.url, IdentityKind.OPERATOR)
    try:
        page.goto(f"{served.url}/ui/")
        expect(page.get_by_text("spiffe://fleet.test/operator/browser-operator")).to_be_visible()
        page.get_by_role("button", name="Sign in with this certificate").click()
        page.get_by_role("heading", name="Fleet").wait_for()
        expect(page.locator(".who")).to_contain_text("operator/browser-operator (certificate)")
        expect(page.locator("#who-role")).to_have_text("role: operator")
    finally:
        page.context.close()


def test_device_certificate_cannot_sign_in_in_the_browser(
    browser: Browser, pki: TestPKI, served: RegistryServer
) -> None:
    from playwright.sync_api import expect

    page = _certificate_page(browser, pki, served.url, IdentityKind.DEVICE)
    try:
        page.goto(f"{served.url}/ui/")
        expect(page.get_by_text("only operators may sign in to the console")).to_be_visible()
        expect(page.get_by_role("button", name="Sign in with this certificate")).to_have_count(0)
    finally:
        page.context.close()


def test_operator_reenrolls_an_expired_device_and_it_connects_again(
    pki: TestPKI,
    served: RegistryServer,
    page: Page,
    operator_api: httpx.Client,
    tmp_path: Path,
) -> None:
    """A device whose certificate expired: the broker refuses it; the operator pastes the CSR
    made on the device into the console, and the certificate it shows gets the device in."""
    from playwright.sync_api import expect

    device_id = "dev-browser-re"
    now = utcnow()
    expired = pki.ca.issue_client(
        pki.ca.identity(IdentityKind.DEVICE, device_id),
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(hours=1),
    )
    response = operator_api.post(
        "/devices", json={"certificate_pem": expired.certificate_pem.decode()}
    )
    assert response.status_code == 201, response.text
    key = generate_key()  # on the device
    csr = build_csr(key, Identity.device(pki.ca.trust_domain, device_id))

    sign_in(page, served.url, make_token(served))
    page.goto(f"{served.url}/ui/devices/{device_id}")
    expect(page.locator("#no-valid-certificate")).to_contain_text("No valid certificate.")
    page.get_by_role("button", name="Re-enroll", exact=True).click()
    page.get_by_label("CSR (PEM)").fill(csr.public_bytes(Encoding.PEM).decode())
    page.get_by_role("button", name="Re-enroll device").click()
    expect(page.get_by_role("status")).to_contain_text(f"{device_id} re-enrolled: serial")
    certificate_pem = page.get_by_label("Certificate (device.crt)").input_value()
    # Post/Redirect/Get: reloading the outcome shows the same certificate, issues none.
    assert "/reenroll?issued=" in page.url, page.url
    page.reload()
    expect(page.get_by_label("Certificate (device.crt)")).to_have_value(certificate_pem)
    assert len(operator_api.get(f"/devices/{device_id}").json()["certificates"]) == 2

    cert_path, key_path = tmp_path / "device.crt", tmp_path / "device.key"
    cert_path.write_text(certificate_pem)
    key_path.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    old_cert, old_key = tmp_path / "old.crt", tmp_path / "old.key"
    write_issued(expired, old_cert, old_key)
    layout = feed_broker_layout(pki, tmp_path / "broker-data")
    settings = broker_settings(layout, registry_url=served.url, broker_feed_wait_s=30)
    with BrokerServer(settings) as broker:
        refused = connect(broker.port, (old_cert, old_key), device_id, root=pki.layout.root_cert)
        refused.close()
        assert not refused.connected.is_set(), "the broker let the expired certificate in"
        device = connect(broker.port, (cert_path, key_path), device_id, root=pki.layout.root_cert)
        try:
            assert device.connected.is_set(), device.reason
        finally:
            device.close()
    page.goto(f"{served.url}/ui/devices/{device_id}")
    expect(page.locator("#certificates tbody tr")).to_have_count(2)
    assert page.locator("#no-valid-certificate").count() == 0


def test_a_viewer_sees_no_decommission_button_and_the_route_refuses_them(
    served: RegistryServer, page: Page, operator_api: httpx.Client, pki: TestPKI, tmp_path: Path
) -> None:
    from playwright.sync_api import expect
    from sqlmodel import Session

    from fleetcore.profile import OperatorRole
    from registry.store import audit, tokens

    files = issue_device(pki, tmp_path, "dev-browser-view")
    operator_api.post("/devices", json={"certificate_pem": files.cert.read_text()})
    with Session(served.state.engine) as session:
        token = tokens.create_token(session, "vicky", audit.Actor(who="test"), OperatorRole.VIEWER)
    sign_in(page, served.url, token)
    page.goto(f"{served.url}/ui/devices/dev-browser-view")
    expect(page.get_by_role("heading", name="dev-browser-view")).to_be_visible()
    expect(page.locator("#who-role")).to_have_text("role: viewer")
    expect(page.get_by_role("button", name="Decommission")).to_have_count(0)
    response = page.goto(f"{served.url}/ui/devices/dev-browser-view/decommission")
    assert response is not None and response.status == 403
    expect(page.get_by_text("Your role, viewer, may read but not act on devices")).to_be_visible()
    assert operator_api.get("/devices/dev-browser-view").json()["status"] == "active"
