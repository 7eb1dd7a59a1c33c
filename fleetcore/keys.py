"""Private keys and CSRs: the key algorithms, generate, serialize. Shared by the factory and by
devices (loading a key file with the factory's errors lives in ``factory.keys``)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fleetcore.profile import Identity, PrivateKey

__all__ = [
    "KEY_ALGORITHMS",
    "build_csr",
    "generate_key",
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
