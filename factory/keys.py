"""Private keys and CSRs: generate, serialize, load. Shared by the factory and by devices."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from factory.errors import CAError
from factory.profile import Identity, PrivateKey

__all__ = [
    "KEY_ALGORITHMS",
    "build_csr",
    "generate_key",
    "load_private_key",
    "load_private_key_pem",
    "private_key_pem",
]

KEY_ALGORITHMS = ("p256", "p384", "ed25519", "rsa2048")


def generate_key(algorithm: str = "p256") -> PrivateKey:
    """A new private key: ``p256`` (default), ``p384``, ``ed25519`` or ``rsa2048``."""
    if algorithm == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(
        f"unknown key algorithm {algorithm!r}; choose one of {', '.join(KEY_ALGORITHMS)}"
    )


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted PEM private key held in memory."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise CAError("unsupported private key type")
    return key


def load_private_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key, raising CAError with a message a person can act on."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"key file {path} does not exist") from None
    except PermissionError:
        raise CAError(f"key file {path} is not readable by this user") from None
    except OSError as exc:
        raise CAError(f"key file {path} cannot be read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        if passphrase:
            raise CAError(f"key file {path} is not encrypted but a passphrase was given") from None
        raise CAError(
            f"key file {path} is encrypted: give its passphrase with --passphrase-file "
            "(CERTFLEET_CA_PASSPHRASE_FILE) or CERTFLEET_CA_PASSPHRASE"
        ) from None
    except ValueError:
        if passphrase:
            raise CAError(f"wrong passphrase for key file {path}") from None
        raise CAError(f"key file {path} is not a readable PEM private key") from None
    if not isinstance(
        key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
    ):
        raise CAError(f"key file {path} holds an unsupported key type")
    return key


def build_csr(key: PrivateKey, identity: Identity) -> x509.CertificateSigningRequest:
    """A CSR as a device builds it: CN = name, one SPIFFE URI SAN."""
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(key, algorithm)
    )
