"""Device ids equal to a service name are refused at minting (issue 11.7): one line, nothing
written."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from factory.ca import CertificateAuthority
from factory.manifest import Manifest
from fleetcore.errors import IdentityError
from fleetcore.layout import DataLayout
from fleetcore.profile import RESERVED_DEVICE_IDS, Identity, IdentityKind
from tests.factory.conftest import TRUST_DOMAIN, run_certfleet
from tests.support.processes import certfleet_in_process


@pytest.mark.parametrize("name", ["registry", "Broker", "factory", "monitor"])
def test_a_reserved_device_id_is_not_an_identity(name: str) -> None:
    with pytest.raises(IdentityError, match=f"device id '{name}' is reserved for a service"):
        Identity.device(TRUST_DOMAIN, name)
    # the same name stays valid for a service, and a longer device id is fine
    assert Identity(TRUST_DOMAIN, IdentityKind.SERVICE, name.lower()).name == name.lower()
    assert Identity.device(TRUST_DOMAIN, f"{name}-1").name == f"{name}-1"


def test_provision_serials_refuses_a_reserved_device_id(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    csv_file = tmp_path / "line.csv"
    csv_file.write_text("hardware_serial,device_id\nHW-1,meter-1\nHW-2,registry\n")
    result = run_certfleet(
        ["factory", "provision", "--serials", str(csv_file), "--data-dir", str(layout.root)]
    )
    assert result.returncode != 0
    assert "'registry' is reserved for a service" in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert not list(Manifest(layout.manifest).records())  # nothing of the batch minted


def test_sign_csr_refuses_a_reserved_device_id(
    ca: CertificateAuthority, layout: DataLayout, tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/device/broker")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "broker.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = certfleet_in_process("factory", "sign-csr", str(path), "--data-dir", str(layout.root))
    assert result.returncode != 0
    assert "'broker' is reserved for a service" in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not list(Manifest(layout.manifest).records())


def test_the_reserved_list_holds_every_service_the_fleet_runs() -> None:
    assert {"registry", "factory", "broker", "monitor"} <= RESERVED_DEVICE_IDS
