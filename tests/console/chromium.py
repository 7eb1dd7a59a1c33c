"""Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, trusting exactly the
registry's server certificate: its SPKI hash goes to ``--ignore-certificate-errors-spki-list``,
so no certificate check is switched off for anything else.

Client certificates (``browser.new_context(client_certificates=...)``) are presented by
Playwright's driver, which makes the TLS connection to the registry itself: it must trust our
root CA, given as ``NODE_EXTRA_CA_CERTS`` to the driver process (``root_ca``).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        return "Chromium not installed: apt-get install chromium chromium-driver (make system-deps)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright not installed: pip install -e '.[test]'"
    return None


def spki_hash(certificate_file: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in ``certificate_file``."""
    certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def chromium(trusted_server_cert: Path, root_ca: Path | None = None) -> Iterator[Browser]:
    """A headless Chromium that accepts ``trusted_server_cert`` (and nothing else unknown);
    with ``root_ca``, Playwright's driver trusts it for client-certificate connections."""

    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or CHROMIUM)
    previous = os.environ.get("NODE_EXTRA_CA_CERTS")
    if root_ca is not None:
        os.environ["NODE_EXTRA_CA_CERTS"] = str(root_ca)  # read once, when the driver starts
    try:
        with _launched(executable, trusted_server_cert) as browser:
            yield browser
    finally:
        if root_ca is not None:
            if previous is None:
                os.environ.pop("NODE_EXTRA_CA_CERTS", None)
            else:
                os.environ["NODE_EXTRA_CA_CERTS"] = previous


@contextmanager
def _launched(executable: Path, trusted_server_cert: Path) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable),
            args=[
                *CHROMIUM_FLAGS,
                f"--ignore-certificate-errors-spki-list={spki_hash(trusted_server_cert)}",
            ],
            timeout=60_000,
        )
        try:
            yield browser
        finally:
            browser.close()
