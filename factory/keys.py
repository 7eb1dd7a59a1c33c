"""Loading the private keys the factory and the registry's signers hold, with clear errors."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from factory.errors import CAError
from fleetcore.profile import PrivateKey

__all__ = ["load_private_key", "load_private_key_pem"]


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
