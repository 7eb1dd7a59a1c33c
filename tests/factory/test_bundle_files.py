"""How bundles are written: chain.pem and root.crt hard-linked from one pair per worker (or
copied where links are refused), nothing left in the temporary folder, and the fast
certificate template giving the same bytes as the obvious builder."""

from __future__ import annotations

import datetime as dt
import errno
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from factory import bundle
from factory.ca import CertificateAuthority
from factory.errors import ProvisionError
from factory.provision import provision_batch
from fleetcore.cert_builders import ClientCertificateTemplate, _leaf_builder
from fleetcore.errors import IdentityError
from fleetcore.layout import DataLayout
from fleetcore.profile import Identity, IdentityKind, certificate_pem


def _ca_file_inodes(layout: DataLayout) -> tuple[set[int], int]:
    """Distinct inodes behind every bundle's chain.pem and root.crt, and the bundle count."""
    inodes: set[int] = set()
    bundles = 0
    for device_dir in layout.devices_dir.iterdir():
        bundles += 1
        for name in ("chain.pem", "root.crt"):
            inodes.add((device_dir / name).stat().st_ino)
    return inodes, bundles


def _assert_ca_files_right(ca: CertificateAuthority, layout: DataLayout) -> None:
    for device_dir in layout.devices_dir.iterdir():
        assert (device_dir / "chain.pem").read_bytes() == ca.chain_pem
        assert (device_dir / "root.crt").read_bytes() == ca.root_pem
    assert not layout.provision_tmp_dir.exists()


def test_bundles_share_one_chain_and_root_per_worker_and_leave_no_temp_files(
    ca: CertificateAuthority, layout: DataLayout
) -> None:
    provision_batch(ca, 5, workers=1)

    inodes, bundles = _ca_file_inodes(layout)
    assert bundles == 5
    assert len(inodes) == 2  # one chain.pem and one root.crt behind all five bundles
    chain = (layout.device_dir("dev-000001") / "chain.pem").stat()
    assert chain.st_nlink == 5  # the pair in the temporary folder is gone
    assert oct(chain.st_mode & 0o777) == oct(0o644)
    _assert_ca_files_right(ca, layout)


def test_each_pool_worker_links_its_own_pair(ca: CertificateAuthority, layout: DataLayout) -> None:
    provision_batch(ca, 600, workers=2, chunk_size=50)

    inodes, bundles = _ca_file_inodes(layout)
    assert bundles == 600
    assert 2 <= len(inodes) <= 4
    total_links = 0
    seen: set[int] = set()
    for device_dir in layout.devices_dir.iterdir():
        info = (device_dir / "chain.pem").stat()
        if info.st_ino not in seen:
            seen.add(info.st_ino)
            total_links += info.st_nlink
    assert total_links == 600  # every link is a bundle's; no pair survives the run
    _assert_ca_files_right(ca, layout)


def test_a_new_pair_is_written_before_the_link_limit(
    ca: CertificateAuthority, layout: DataLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bundle, "LINKS_PER_SHARED_PAIR", 3)

    provision_batch(ca, 7, workers=1)

    inodes, _ = _ca_file_inodes(layout)
    assert len(inodes) == 2 * 3  # pairs for bundles 1-3, 4-6 and 7
    _assert_ca_files_right(ca, layout)


def test_a_link_refused_for_too_many_links_starts_a_new_pair(
    ca: CertificateAuthority, layout: DataLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link
    calls = 0

    def link_with_low_limit(source: str, target: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:  # the third bundle's chain.pem: a filesystem with a lower limit
            raise OSError(errno.EMLINK, "Too many links", source)
        real_link(source, target)

    monkeypatch.setattr(bundle.os, "link", link_with_low_limit)

    provision_batch(ca, 4, workers=1)

    inodes, bundles = _ca_file_inodes(layout)
    assert bundles == 4
    assert len(inodes) == 4  # bundles 1-2 on the first pair, 3-4 on the second
    _assert_ca_files_right(ca, layout)


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.EXDEV, errno.ENOTSUP])
def test_a_filesystem_without_hard_links_gets_plain_copies(
    ca: CertificateAuthority, layout: DataLayout, monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    def no_links(source: str, target: str) -> None:
        raise OSError(refusal, os.strerror(refusal), source)

    monkeypatch.setattr(bundle.os, "link", no_links)

    provision_batch(ca, 3, workers=1)

    for device_dir in layout.devices_dir.iterdir():
        for name in ("chain.pem", "root.crt"):
            assert (device_dir / name).stat().st_nlink == 1
    _assert_ca_files_right(ca, layout)


def test_any_other_link_error_stops_the_run_with_a_clear_error(
    ca: CertificateAuthority, layout: DataLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(source: str, target: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", target)

    monkeypatch.setattr(bundle.os, "link", disk_full)

    with pytest.raises(ProvisionError, match="dev-000001.*No space left.*run the same command"):
        provision_batch(ca, 2, workers=1)
    assert not any(layout.devices_dir.iterdir())  # no bundle went into place half made


# -- the certificate template ------------------------------------------------------------


def _obvious_builder(
    ca: CertificateAuthority, identity: Identity, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    """DESIGN.md's device profile with one setter call per field: the builder the server
    certificates use, plus the device's SPIFFE URI."""
    return _leaf_builder(
        subject_cn=identity.name,
        public_key=public_key,
        issuer_cert=ca.issuing_cert,
        not_before=dt.datetime(2026, 1, 1, 12, 0, 0),
        not_after=dt.datetime(2027, 1, 1, 12, 0, 0),
        serial=0x1234567890ABCDEF,
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        key_usage_encipherment=False,
    ).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
        critical=False,
    )


def test_template_gives_the_same_certificate_bytes_as_the_obvious_builder(
    ca: CertificateAuthority,
) -> None:
    identity = Identity(ca.trust_domain, IdentityKind.DEVICE, "dev-same")
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    template = ClientCertificateTemplate(ca.issuing_cert, ca.issuing_key)

    fast = template.build(
        identity=identity,
        public_key=public_key,
        # aware times in another zone: the template must write them as UTC, like the setters
        not_before=dt.datetime(2026, 1, 1, 13, 0, 0, 654321, dt.timezone(dt.timedelta(hours=1))),
        not_after=dt.datetime(2027, 1, 1, 12, 0, 0, tzinfo=dt.UTC),
        serial=0x1234567890ABCDEF,
    )
    reference = _obvious_builder(ca, identity, public_key).sign(ca.issuing_key, hashes.SHA256())

    assert fast.tbs_certificate_bytes == reference.tbs_certificate_bytes
    assert fast.not_valid_before_utc == dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    fast.verify_directly_issued_by(ca.issuing_cert)


def test_template_refuses_an_inverted_validity_and_an_out_of_range_serial(
    ca: CertificateAuthority,
) -> None:
    identity = Identity(ca.trust_domain, IdentityKind.DEVICE, "dev-bad")
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    template = ClientCertificateTemplate(ca.issuing_cert, ca.issuing_key)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    with pytest.raises(IdentityError, match="is not after not_before"):
        template.build(identity=identity, public_key=public_key, not_before=start, not_after=start)
    for serial in (0, -5, 1 << 159):
        with pytest.raises(IdentityError, match="serial must be positive"):
            template.build(
                identity=identity,
                public_key=public_key,
                not_before=start,
                not_after=start + dt.timedelta(days=1),
                serial=serial,
            )


def test_certificate_pem_is_the_same_as_cryptography_writes(ca: CertificateAuthority) -> None:
    assert certificate_pem(ca.issuing_cert) == ca.issuing_cert.public_bytes(Encoding.PEM)
    assert certificate_pem(ca.root_cert) == ca.root_cert.public_bytes(Encoding.PEM)
