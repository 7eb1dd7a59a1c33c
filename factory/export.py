"""A device bundle in the formats other tools want: PKCS#12 (key, certificate and CA chain,
password-protected) and DER (the certificate alone).

PKCS#12 uses AES-256-CBC with PBKDF2 (cryptography's best available), which OpenSSL 3,
Windows, Java 9+ and browsers read; the file is written 0600, it holds the private key.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from factory.errors import CAError, ExportError
from factory.keys import load_private_key
from fleetcore.config import read_secret_file
from fleetcore.layout import DataLayout, write_private, write_public
from fleetcore.profile import check_name

__all__ = [
    "MIN_PASSWORD_LENGTH",
    "export_der",
    "export_pkcs12",
    "read_password_file",
    "write_export",
]

MIN_PASSWORD_LENGTH = 8


def read_password_file(path: Path, what: str = "--password-file") -> bytes:
    """A password from the first line of ``path`` (:func:`fleetcore.config.read_secret_file`:
    missing, empty or other-readable files are refused), at least MIN_PASSWORD_LENGTH long."""
    password = read_secret_file(path, what)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ExportError(
            f"{what} {path}: the password on its first line is shorter than "
            f"{MIN_PASSWORD_LENGTH} characters"
        )
    return password


def _bundle_files(layout: DataLayout, device_id: str) -> tuple[Path, Path, Path]:
    check_name(device_id, "device id")
    folder = layout.device_dir(device_id)
    files = (folder / "device.crt", folder / "device.key", folder / "chain.pem")
    missing = [p.name for p in files if not p.exists()]
    if missing:
        raise ExportError(
            f"no complete bundle for {device_id} in {layout.devices_dir} (missing "
            f"{', '.join(missing)}); provision it first or pass --data-dir"
        )
    return files


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable PEM certificate: {exc}") from None


def export_pkcs12(layout: DataLayout, device_id: str, password: bytes) -> bytes:
    """``device_id``'s key, certificate and CA chain as an encrypted PKCS#12."""
    cert_path, key_path, chain_path = _bundle_files(layout, device_id)
    certificate = _load_certificate(cert_path)
    try:
        key = load_private_key(key_path)
        chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
    except (CAError, OSError, ValueError) as exc:
        raise ExportError(f"bundle of {device_id} is unusable: {exc}") from None
    return pkcs12.serialize_key_and_certificates(
        name=device_id.encode(),
        key=key,
        cert=certificate,
        cas=chain,
        encryption_algorithm=serialization.BestAvailableEncryption(password),
    )


def export_der(layout: DataLayout, device_id: str) -> bytes:
    """``device_id``'s certificate, DER."""
    cert_path, _, _ = _bundle_files(layout, device_id)
    return _load_certificate(cert_path).public_bytes(serialization.Encoding.DER)


def write_export(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    """Write an export (0600 when ``secret``); refuse to replace a file unless ``force``."""
    if path.exists() and not force:
        raise ExportError(f"{path} already exists; pass --force to replace it (nothing written)")
    if not path.parent.is_dir():
        raise ExportError(f"folder {path.parent} does not exist")
    try:
        (write_private if secret else write_public)(path, data)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror}") from None
