"""Settings from the environment, and an encrypted issuing key (CERTFLEET_CA_PASSPHRASE)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from factory.ca import CertificateAuthority
from factory.errors import CAError
from fleetcore.errors import ConfigError
from fleetcore.layout import DataLayout
from registry.main import create_app
from registry.settings import build_settings, split_addr


def test_encrypted_ca_key_needs_the_passphrase_to_sign_crls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = DataLayout(tmp_path / "data")
    CertificateAuthority.init(layout, "secret.test", passphrase=b"correct horse")
    monkeypatch.setenv("CERTFLEET_DATA_DIR", str(layout.root))
    monkeypatch.delenv("CERTFLEET_CA_PASSPHRASE", raising=False)
    with pytest.raises(CAError, match="CERTFLEET_CA_PASSPHRASE"):
        create_app(build_settings())
    monkeypatch.setenv("CERTFLEET_CA_PASSPHRASE", "wrong")
    with pytest.raises(CAError, match="wrong passphrase"):
        create_app(build_settings())
    monkeypatch.setenv("CERTFLEET_CA_PASSPHRASE", "correct horse")
    app = create_app(build_settings())
    state = app.state.registry
    try:
        crl = x509.load_pem_x509_crl(state.crl.current().pem)
        assert crl.issuer == state.ca.issuing_cert.subject
    finally:
        state.close()
        state.engine.dispose()


def test_settings_come_from_the_environment_and_flags_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTFLEET_REGISTRY_ADDR", "127.0.0.1:9443")
    monkeypatch.setenv("CERTFLEET_REGISTRY_DATABASE_URL", "postgresql://db/x")
    monkeypatch.setenv("CERTFLEET_DATA_DIR", str(tmp_path))
    settings = build_settings()
    assert settings.registry_addr == "127.0.0.1:9443"
    assert settings.database_url == "postgresql://db/x"
    assert build_settings(registry_addr="127.0.0.1:0").registry_addr == "127.0.0.1:0"
    monkeypatch.delenv("CERTFLEET_REGISTRY_DATABASE_URL")
    assert build_settings().database_url == f"sqlite:///{(tmp_path / 'registry.db').resolve()}"


def test_bad_addresses_and_database_urls_are_refused(tmp_path: Path) -> None:
    assert split_addr("127.0.0.1:8443") == ("127.0.0.1", 8443)
    for bad in ("127.0.0.1", ":80", "host:http", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="address"):
            split_addr(bad)
    from registry.db import make_engine

    with pytest.raises(ConfigError, match="unsupported CERTFLEET_REGISTRY_DATABASE_URL scheme"):
        make_engine(build_settings(data_dir=tmp_path, registry_database_url="mysql://x/y"))
