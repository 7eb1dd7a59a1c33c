"""The console over real HTTPS on both databases: sign-in and its refusals, sessions, CSRF,
the pages' content and escaping, keyset pages of the device list, and /docs."""

from __future__ import annotations

import datetime as dt
import html as html_module
import re
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import update
from sqlmodel import Session

from factory.ca import IssuedCertificate
from fleetcore.keys import build_csr, generate_key
from fleetcore.profile import Identity, IdentityKind, serial_hex
from registry.models import ConsoleSession
from registry.server import RegistryServer
from registry.settings import RegistrySettings
from registry.store import audit, telemetry, tokens
from tests.console.conftest import Console, csrf_of, make_token
from tests.support.pki import TRUST_DOMAIN, ClientFiles, TestPKI, pem

Mint = Callable[..., IssuedCertificate]
MakeConsole = Callable[..., Console]
ConsoleAt = Callable[[str, ClientFiles | None], Console]


def register(operator: httpx.Client, *issued: IssuedCertificate) -> None:
    body = {"devices": [{"certificate_pem": pem(c)} for c in issued]}
    response = operator.post("/devices/batch", json=body)
    assert response.status_code == 200, response.text


def text_of(html: str) -> str:
    """The page's text, roughly as a person reads it (tags out, whitespace squeezed)."""
    return html_module.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip())


# -- sign-in ---------------------------------------------------------------------------------


def test_sign_in_with_token_sets_a_strict_session_cookie(
    registry: RegistryServer, console: Console
) -> None:
    response = console.sign_in(make_token(registry))
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"
    cookie = next(
        c
        for c in response.headers.get_list("set-cookie")
        if c.startswith("__Host-certfleet_console=")
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "path", "max-age", "expires"} <= attributes
    assert "samesite=strict" in cookie.lower()
    assert "domain" not in attributes
    fleet = console.http.get("/ui/")
    assert fleet.status_code == 200
    assert "<h1>Fleet</h1>" in fleet.text
    assert "operator/alice" in fleet.text


def test_pages_send_someone_signed_out_to_the_sign_in_page(console: Console) -> None:
    for path in (
        "/ui/",
        "/ui/devices?q=dev",
        "/ui/devices/dev-1",
        "/ui/devices/dev-1/decommission",
    ):
        response = console.http.get(path)
        assert response.status_code == 303, path
        location = urlsplit(response.headers["location"])
        assert location.path == "/ui/sign-in"
        assert parse_qs(location.query)["next"] == [path]
    assert console.http.get("/ui/fleet/live").status_code == 401


def test_sign_in_returns_to_the_page_asked_for_but_never_off_site(
    registry: RegistryServer, console_factory: MakeConsole
) -> None:
    token = make_token(registry)
    for next_url, expected in (
        ("/ui/devices?q=dev", "/ui/devices?q=dev"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/", "/ui/"),
        ("/api/v1/devices", "/ui/"),
    ):
        console = console_factory()
        form = console.http.get("/ui/sign-in")
        response = console.http.post(
            "/ui/sign-in",
            data={"token": token, "csrf_token": csrf_of(form.text), "next": next_url},
        )
        assert response.headers["location"] == expected, next_url


def test_sign_in_page_sends_someone_signed_in_on(
    registry: RegistryServer, console: Console
) -> None:
    assert console.sign_in(make_token(registry)).status_code == 303
    again = console.http.get("/ui/sign-in?next=/ui/devices")
    assert again.status_code == 303
    assert again.headers["location"] == "/ui/devices"
    assert console.http.get("/ui/sign-in?next=//evil.example/").headers["location"] == "/ui/"


def test_wrong_token_is_refused_with_a_clear_message(console: Console) -> None:
    response = console.sign_in("cfr_not-a-token")
    assert response.status_code == 401
    assert "That operator token is unknown or revoked" in response.text
    assert not any(
        c.startswith("__Host-certfleet_console=") for c in response.headers.get_list("set-cookie")
    )
    assert console.http.get("/ui/").status_code == 303


def test_empty_token_asks_for_one(console: Console) -> None:
    response = console.sign_in("  ")
    assert response.status_code == 400
    assert "Enter your operator token." in response.text


def test_revoked_token_cannot_sign_in_and_ends_its_sessions(
    registry: RegistryServer, console: Console, console_factory: MakeConsole
) -> None:
    token = make_token(registry, "dave")
    assert console.sign_in(token).status_code == 303
    assert console.http.get("/ui/").status_code == 200
    with Session(registry.state.engine) as session:
        tokens.revoke_tokens(session, audit.Actor(who="test"), operator="dave")
    assert console.http.get("/ui/").status_code == 303  # the open session ended at once
    assert console_factory().sign_in(token).status_code == 401


def test_repeated_failures_are_rate_limited_across_registry_processes(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    settings = registry_settings.model_copy(update={"console_signin_max_failures": 3})
    with RegistryServer(settings) as first:
        token = make_token(first)
        one = console_at(first.url, None)
        for _ in range(3):
            assert one.sign_in("cfr_wrong").status_code == 401
        # A second registry on the same database counts the same failures.
        with RegistryServer(settings) as second:
            two = console_at(second.url, None)
            limited = two.sign_in(token)
            two.http.close()  # no keep-alive connection holds the server's shutdown
            assert limited.status_code == 429
            assert "Too many failed sign-ins from 127.0.0.1. Try again in" in limited.text
            assert 1 <= int(limited.headers["retry-after"]) <= 300
        assert one.sign_in(token).status_code == 429  # a right token does not skip the wait
        one.http.close()


def test_session_survives_a_registry_restart(
    registry_settings: RegistrySettings, console_at: ConsoleAt
) -> None:
    with RegistryServer(registry_settings) as first:
        console = console_at(first.url, None)
        assert console.sign_in(make_token(first)).status_code == 303
        cookies = console.http.cookies
        console.http.close()
    with RegistryServer(registry_settings) as second:
        again = console_at(second.url, None)
        again.http.cookies = cookies
        assert again.http.get("/ui/").status_code == 200
        again.http.close()


def test_expired_session_is_refused(registry: RegistryServer, console: Console) -> None:
    assert console.sign_in(make_token(registry)).status_code == 303
    with Session(registry.state.engine) as session:
        session.execute(
            update(ConsoleSession).values(
                expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            )
        )
        session.commit()
    assert console.http.get("/ui/").status_code == 303


def test_sign_out_ends_the_session_even_for_a_copied_cookie(
    registry: RegistryServer, console: Console, console_factory: MakeConsole
) -> None:
    assert console.sign_in(make_token(registry)).status_code == 303
    copy = console_factory()
    copy.http.cookies = httpx.Cookies(console.http.cookies)
    response = console.http.post("/ui/sign-out", data={"csrf_token": console.csrf()})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/sign-in?signed_out=1"
    assert "Signed out." in console.http.get("/ui/sign-in?signed_out=1").text
    assert console.http.get("/ui/").status_code == 303
    assert copy.http.get("/ui/").status_code == 303


def test_operator_certificate_signs_in(
    registry: RegistryServer, pki: TestPKI, console_factory: MakeConsole
) -> None:
    console = console_factory(pki.client(IdentityKind.OPERATOR, "carol"))
    form = console.http.get("/ui/sign-in")
    assert "spiffe://fleet.test/operator/carol" in form.text
    response = console.http.post(
        "/ui/sign-in/certificate", data={"csrf_token": csrf_of(form.text), "next": ""}
    )
    assert response.status_code == 303
    page = console.http.get("/ui/")
    assert "operator/carol" in page.text and "(certificate)" in page.text


@pytest.mark.parametrize("kind", [IdentityKind.DEVICE, IdentityKind.SERVICE])
def test_device_and_service_certificates_are_refused(
    kind: IdentityKind, pki: TestPKI, console_factory: MakeConsole
) -> None:
    console = console_factory(pki.client(kind, f"console-{kind.value}"))
    form = console.http.get("/ui/sign-in")
    assert "Sign in with this certificate" not in form.text
    response = console.http.post(
        "/ui/sign-in/certificate", data={"csrf_token": csrf_of(form.text), "next": ""}
    )
    assert response.status_code == 403
    assert (
        f"spiffe://fleet.test/{kind.value}/console-{kind.value} is a {kind.value} identity; "
        "only operators may sign in to the console."
    ) in text_of(response.text)
    assert console.http.get("/ui/").status_code == 303


def test_certificate_sign_in_without_a_certificate_is_refused(console: Console) -> None:
    form = console.http.get("/ui/sign-in")
    response = console.http.post(
        "/ui/sign-in/certificate", data={"csrf_token": csrf_of(form.text), "next": ""}
    )
    assert response.status_code == 401
    assert "Your browser presented no client certificate" in response.text


# -- CSRF ------------------------------------------------------------------------------------


def test_post_without_the_csrf_token_is_refused(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    register(operator, mint("dev-csrf-1"))
    assert console.sign_in(make_token(registry)).status_code == 303
    for data in ({"reason": "stolen"}, {"reason": "stolen", "csrf_token": "guess"}):
        response = console.http.post("/ui/devices/dev-csrf-1/decommission", data=data)
        assert response.status_code == 403
        assert "security token (CSRF) is missing or out of date" in response.text
    assert operator.get("/devices/dev-csrf-1").json()["status"] == "active"
    refused = console.http.post("/ui/sign-out", data={})
    assert refused.status_code == 403
    assert console.http.get("/ui/").status_code == 200  # still signed in


def test_post_from_another_site_is_refused(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    register(operator, mint("dev-origin-1"))
    assert console.sign_in(make_token(registry)).status_code == 303
    response = console.http.post(
        "/ui/devices/dev-origin-1/decommission",
        data={"reason": "x", "csrf_token": console.csrf()},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert "sent from another site (https://evil.example)" in response.text
    assert operator.get("/devices/dev-origin-1").json()["status"] == "active"


def test_sign_in_form_without_its_csrf_token_is_refused(
    registry: RegistryServer, console: Console
) -> None:
    console.http.get("/ui/sign-in")
    response = console.http.post("/ui/sign-in", data={"token": make_token(registry)})
    assert response.status_code == 403
    assert "sign-in form's security token (CSRF) is missing" in text_of(response.text)


# -- pages -----------------------------------------------------------------------------------


def test_fleet_page_counts_expiries_and_latest_revocations(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    now = dt.datetime.now(dt.UTC)
    days = (3, 20, 60, 200)
    register(operator, *(mint(f"dev-exp-{d}", not_after=now + dt.timedelta(days=d)) for d in days))
    assert (
        operator.post("/devices/dev-exp-200/decommission", json={"reason": "lost"}).status_code
        == 200
    )
    assert console.sign_in(make_token(registry)).status_code == 303
    page = console.http.get("/ui/")
    assert page.status_code == 200
    figures = dict(re.findall(r'id="([a-z0-9-]+)">([\d,]+)<', page.text))
    assert figures == {
        "count-active": "3",
        "count-decommissioned": "1",
        "seen-last-minute": "0",
        "expiring-7": "1",
        "expiring-30": "2",
        "expiring-90": "3",
    }
    assert page.text.count('<rect class="bar"') >= 3  # one bar per week from now to +60 days
    assert '<a href="/ui/devices/dev-exp-200">dev-exp-200</a>' in page.text
    live = console.http.get("/ui/fleet/live")
    assert (
        live.status_code == 200 and "<html" not in live.text and 'id="count-active">3<' in live.text
    )


def test_device_page_shows_certificates_telemetry_and_audit(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    issued = mint("dev-page-1")
    register(operator, issued)
    seen = dt.datetime.now(dt.UTC)
    with Session(registry.state.engine) as session:
        telemetry.record_telemetry(
            session,
            [telemetry.TelemetryUpdate("dev-page-1", seen, {"temp_c": 21.5, "note": "<i>hi</i>"})],
        )
    assert console.sign_in(make_token(registry)).status_code == 303
    page = console.http.get("/ui/devices/dev-page-1")
    assert page.status_code == 200
    assert "<h1>dev-page-1</h1>" in page.text
    assert f"{issued.certificate.serial_number:x}" in page.text
    assert "&#34;temp_c&#34;: 21.5" in page.text
    assert "&lt;i&gt;hi&lt;/i&gt;" in page.text and "<i>hi</i>" not in page.text
    assert seen.strftime("%Y-%m-%d %H:%M:%S UTC") in page.text
    assert '<button type="submit" class="danger">Decommission</button>' in page.text


def test_decommission_through_the_console_records_reason_and_code(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    issued = mint("dev-dec-1")
    register(operator, issued)
    assert console.sign_in(make_token(registry)).status_code == 303
    reason = '<script>alert("x")</script> stolen & <b>gone</b>'
    csrf = console.csrf("/ui/devices/dev-dec-1/decommission")
    response = console.http.post(
        "/ui/devices/dev-dec-1/decommission",
        data={"reason": reason, "reason_code": "keyCompromise", "csrf_token": csrf},
    )
    # Post/Redirect/Get: the outcome is a page of its own, so a reload does not post again.
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/devices/dev-dec-1?decommissioned=1"
    outcome = response.headers["location"]
    for _reload in range(2):
        response = console.http.get(outcome)
        assert response.status_code == 200
        assert "dev-dec-1 decommissioned: revocation #1 is in the feed" in text_of(response.text)
    assert "<script>alert" not in response.text and "<b>gone</b>" not in response.text
    assert (
        "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; stolen &amp; &lt;b&gt;gone&lt;/b&gt;"
        in response.text
    )
    # The notice says only what the database says: no other device's or an unknown event.
    register(operator, mint("dev-dec-2"))
    for other in (
        "/ui/devices/dev-dec-2?decommissioned=1",
        "/ui/devices/dev-dec-1?decommissioned=9",
    ):
        page = console.http.get(other)
        assert page.status_code == 200 and "decommissioned: revocation" not in page.text
    device = operator.get("/devices/dev-dec-1").json()
    assert device["status"] == "decommissioned"
    assert {c["status"] for c in device["certificates"]} == {"revoked"}
    feed = operator.get("/revocations", params={"after": 0}).json()
    assert [(e["device_id"], e["reason"], e["reason_code"]) for e in feed["events"]] == [
        ("dev-dec-1", reason, "keyCompromise")
    ]
    # The REST route's service function ran: counted, and the CRL lists the serial with its
    # reason (the CRL is served re-signed once the feed head moved).
    metrics = operator.get("/metrics").text
    assert "certfleet_registry_decommissions_total 1.0" in metrics
    crl = x509.load_der_x509_crl(operator.get("/crl.der").content)
    entry = crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    fleet = console.http.get("/ui/")
    assert "&lt;script&gt;alert" in fleet.text and "<script>alert" not in fleet.text
    again = console.http.post(
        "/ui/devices/dev-dec-1/decommission",
        data={"reason": "again", "csrf_token": csrf},
    )
    assert again.status_code == 409
    assert "was already decommissioned" in again.text
    assert len(operator.get("/revocations", params={"after": 0}).json()["events"]) == 1


def test_decommission_refuses_a_bad_reason_or_code(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    register(operator, mint("dev-dec-2"))
    assert console.sign_in(make_token(registry)).status_code == 303
    csrf = console.csrf()
    for data in (
        {"reason": "   ", "reason_code": "superseded"},
        {"reason": "x" * 501},
        {"reason": "ok", "reason_code": "certificateHold"},
    ):
        response = console.http.post(
            "/ui/devices/dev-dec-2/decommission", data={**data, "csrf_token": csrf}
        )
        assert response.status_code == 400, data
        assert "Give a reason of 1 to 500 characters" in response.text
    assert operator.get("/devices/dev-dec-2").json()["status"] == "active"
    missing = console.http.post(
        "/ui/devices/dev-nobody/decommission", data={"reason": "x", "csrf_token": csrf}
    )
    assert missing.status_code == 404 and "No device dev-nobody is registered." in missing.text


def test_reenroll_through_the_console_for_an_expired_device_only(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = mint("dev-re-1", not_before=now - dt.timedelta(days=30), not_after=now - _HOUR)
    register(operator, expired, mint("dev-re-2"))
    assert console.sign_in(make_token(registry)).status_code == 303
    page = console.http.get("/ui/devices/dev-re-1")
    assert "No valid certificate." in text_of(page.text)
    assert "No valid certificate." not in text_of(console.http.get("/ui/devices/dev-re-2").text)
    csrf = console.csrf("/ui/devices/dev-re-1/reenroll")
    key = generate_key()
    csr = build_csr(key, Identity.device(TRUST_DOMAIN, "dev-re-1"))
    csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()

    without_csrf = console.http.post("/ui/devices/dev-re-1/reenroll", data={"csr_pem": csr_pem})
    assert without_csrf.status_code == 403
    for bad in ("", "x" * 20_000, "not a CSR", _csr_for("dev-re-2")):
        refused = console.http.post(
            "/ui/devices/dev-re-1/reenroll", data={"csr_pem": bad, "csrf_token": csrf}
        )
        assert refused.status_code == 400, (bad, refused.text)
        assert 'role="alert"' in refused.text
    assert len(operator.get("/devices/dev-re-1").json()["certificates"]) == 1

    posted = console.http.post(
        "/ui/devices/dev-re-1/reenroll", data={"csr_pem": csr_pem, "csrf_token": csrf}
    )
    # Post/Redirect/Get: the certificate is shown by a page of its own (a reload re-posts
    # nothing); the same CSR posted again gets the same certificate, said so.
    assert posted.status_code == 303, posted.text
    assert posted.headers["location"].startswith("/ui/devices/dev-re-1/reenroll?issued=")
    done = console.http.get(posted.headers["location"])
    assert done.status_code == 200, done.text
    assert "dev-re-1 re-enrolled: serial" in text_of(done.text)
    again = console.http.post(
        "/ui/devices/dev-re-1/reenroll", data={"csr_pem": csr_pem, "csrf_token": csrf}
    )
    assert again.status_code == 303
    assert again.headers["location"] == posted.headers["location"] + "&repeated=1"
    assert "(issued before for this CSR)" in console.http.get(again.headers["location"]).text
    shown = re.search(r'<textarea id="certificate"[^>]*>([^<]+)</textarea>', done.text)
    assert shown is not None
    certificate = x509.load_pem_x509_certificate(html_module.unescape(shown.group(1)).encode())
    assert certificate.public_key() == key.public_key()
    device = operator.get("/devices/dev-re-1").json()
    assert device["certificates"][-1]["serial"] == serial_hex(certificate.serial_number)
    entries = operator.get("/devices/dev-re-1/audit").json()["entries"]
    assert (entries[0]["action"], entries[0]["who"]) == ("reenroll", "console:operator/alice")
    assert "No valid certificate." not in text_of(console.http.get("/ui/devices/dev-re-1").text)
    # The outcome page shows only a certificate of this device.
    other_serial = device_serial(operator, "dev-re-2")
    for bad_query in (f"issued={other_serial}", "issued=not-hex", "issued=abc123"):
        shown_other = console.http.get(f"/ui/devices/dev-re-1/reenroll?{bad_query}")
        assert shown_other.status_code == 404, bad_query

    # A device with a valid certificate renews itself: 409 and the reason, nothing written.
    conflict = console.http.post(
        "/ui/devices/dev-re-2/reenroll",
        data={"csr_pem": _csr_for("dev-re-2"), "csrf_token": csrf},
    )
    assert conflict.status_code == 409
    assert "renews itself over MQTT" in text_of(conflict.text)
    assert len(operator.get("/devices/dev-re-2").json()["certificates"]) == 1
    missing = console.http.post(
        "/ui/devices/dev-nobody/reenroll",
        data={"csr_pem": _csr_for("dev-nobody"), "csrf_token": csrf},
    )
    assert missing.status_code == 404


_HOUR = dt.timedelta(hours=1)


def device_serial(operator: httpx.Client, device_id: str) -> str:
    serial: str = operator.get(f"/devices/{device_id}").json()["certificates"][-1]["serial"]
    return serial


def _csr_for(device_id: str) -> str:
    csr = build_csr(generate_key(), Identity.device(TRUST_DOMAIN, device_id))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_device_search_by_prefix_pages_by_keyset(
    registry: RegistryServer, console: Console, operator: httpx.Client, mint: Mint
) -> None:
    ids = [f"dev-s{i:03d}" for i in range(120)]
    register(operator, *(mint(i) for i in ids))
    register(operator, mint("dev-t000"), mint("dew-s000"))
    assert console.sign_in(make_token(registry)).status_code == 303
    seen: list[str] = []
    url = "/ui/devices?q=dev-s"
    for _ in range(10):
        page = console.http.get(url)
        assert page.status_code == 200
        seen += re.findall(r'<a href="/ui/devices/([^"]+)">', page.text)
        found = re.search(r'<a href="([^"]+)" rel="next">', page.text)
        if not found:
            break
        url = found.group(1).replace("&amp;", "&")
    assert seen == ids
    decommissioned = console.http.get("/ui/devices?q=dev-&status=decommissioned")
    assert "No device matches." in decommissioned.text


def test_device_search_refuses_bad_filters_with_a_message(
    registry: RegistryServer, console: Console
) -> None:
    assert console.sign_in(make_token(registry)).status_code == 303
    cases = {
        "q=<script>": "A device id prefix has at most 64 letters",
        "status=gone": "Status is &#39;active&#39;, &#39;decommissioned&#39; or any.",
        "expiring_before=tomorrow": "Expiring before is a date like 2027-01-31.",
    }
    for query, message in cases.items():
        response = console.http.get(f"/ui/devices?{query}")
        assert response.status_code == 400, query
        assert message in response.text
    assert 'value="&lt;script&gt;"' in console.http.get("/ui/devices?q=<script>").text
    bad_cursor = console.http.get("/ui/devices?cursor=%%%")
    assert bad_cursor.status_code == 422  # the registry's own refusal, as a page
    assert bad_cursor.headers["content-type"].startswith("text/html")
    assert "cursor is not one this registry handed out" in bad_cursor.text


def test_unknown_device_page_is_a_404_page(registry: RegistryServer, console: Console) -> None:
    assert console.sign_in(make_token(registry)).status_code == 303
    assert console.http.get("/ui/devices/dev-none").status_code == 404
    assert console.http.get("/ui/devices/bad%20id").status_code == 404


def test_console_pages_carry_security_headers(registry: RegistryServer, console: Console) -> None:
    response = console.http.get("/ui/sign-in")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    assert re.fullmatch(r"app;dur=\d+\.\d\d", response.headers["server-timing"])
    assert "<script>" not in response.text  # scripts are files, no inline code


def test_every_https_answer_carries_strict_transport_security(
    registry: RegistryServer, console: Console, operator: httpx.Client
) -> None:
    answers = [
        console.http.get("/ui/sign-in"),  # a page
        console.http.get("/ui/"),  # a redirect to the sign-in page
        console.http.get("/ui/static/console.css"),  # an asset
        console.http.post("/ui/sign-in", data={"token": "x"}),  # a refusal page (CSRF)
        console.http.get("/docs"),
        console.http.get("/api/v1/openapi.json"),
        console.http.get("/api/v1/devices"),  # 401, JSON
        operator.get("/devices"),  # 200, JSON
        operator.get("/devices/dev-none"),  # 404, JSON
        operator.get("/healthz"),
        operator.get("/metrics"),
        console.http.get("/no/such/path"),  # 404 of the framework
    ]
    for answer in answers:
        assert answer.headers.get("strict-transport-security") == "max-age=31536000", (
            answer.request.url,
            answer.status_code,
        )


# -- /docs -----------------------------------------------------------------------------------


def test_docs_are_served_from_local_assets(console: Console) -> None:
    page = console.http.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith(("/docs/assets/", "/ui/static/")) for s in sources)
    for source in sources:
        asset = console.http.get(source)
        assert asset.status_code == 200, source
    bundle = console.http.get("/docs/assets/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in bundle.text


def test_openapi_declares_bearer_and_mutual_tls_schemes(console: Console) -> None:
    schema = console.http.get("/api/v1/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearerAuth"]["description"],
    }
    assert schemes["mutualTLS"]["type"] == "mutualTLS"
    paths = schema["paths"]
    for path, method in (
        ("/api/v1/devices", "get"),
        ("/api/v1/devices/{device_id}/decommission", "post"),
        ("/api/v1/revocations", "get"),
    ):
        assert paths[path][method]["security"] == [{"bearerAuth": []}, {"mutualTLS": []}]
    assert "security" not in paths["/api/v1/healthz"]["get"]
    assert not any(p.startswith("/ui") for p in paths)
