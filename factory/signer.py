"""The CA's signer: the one interface every signature of certfleet goes through.

The CA's code has one home, :mod:`factory.ca` plus this module, used by the factory and the
registry alike. A CA key is a ``cryptography`` private key object: either a key read from a
PEM file (the embedded default), or a :class:`TokenKey`, a private-key object whose ``sign``
runs inside a PKCS#11 token (python-pkcs11; SoftHSM2 in tests). ``cryptography``'s builders
(certificates, CRLs, OCSP responses) call the key's own ``sign`` method, so every builder
signs with a token key unchanged: device and server certificates, CSR signing, renewal,
CRLs and OCSP answers all take the same path.

Where the keys are: ``ca init --pkcs11-module LIB --pkcs11-token LABEL --pin-file FILE``
generates the root, issuing and OCSP keys in the token (non-extractable, sensitive) and
records their RFC 7512 URIs in ``ca/ca.json``; ``CERTFLEET_CA_ISSUING_KEY`` (a ``pkcs11:``
URI or a PEM file) and ``CERTFLEET_CA_OCSP_KEY`` override the record. The PIN comes from
``CERTFLEET_CA_PIN_FILE`` (or the file recorded at init; 0600 enforced) or
``CERTFLEET_CA_PIN``, never from a flag, and is never logged.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from factory.errors import CAError
from fleetcore.config import read_secret_file, secret_bytes, settings_from_env
from fleetcore.keys import private_key_pem
from fleetcore.profile import PrivateKey, PublicKey

__all__ = [
    "CaKeySettings",
    "CaKeys",
    "KeySource",
    "Pkcs11Uri",
    "Signer",
    "TokenKey",
    "TokenKeyRecord",
    "build_key_settings",
    "generate_token_key",
    "generate_token_keys",
    "open_token_key",
]

log = logging.getLogger(__name__)

#: The token object labels ``ca init --pkcs11-token`` creates.
TOKEN_LABELS = {"root": "certfleet-root", "issuing": "certfleet-issuing", "ocsp": "certfleet-ocsp"}
_CURVES: dict[str, tuple[str, type[ec.EllipticCurve]]] = {
    "p256": ("secp256r1", ec.SECP256R1),
    "p384": ("secp384r1", ec.SECP384R1),
}
#: RFC 7512 path attributes we read; anything else in a URI is refused, not ignored.
_PATH_ATTRIBUTES = frozenset({"token", "object", "type", "id", "manufacturer", "serial", "model"})
_QUERY_ATTRIBUTES = frozenset({"module-path", "pin-source"})


@runtime_checkable
class Signer(Protocol):
    """What the CA needs of a key: its public half and a signature over bytes. A file key
    (``cryptography``'s own) and a :class:`TokenKey` both are one."""

    def public_key(self) -> Any: ...

    def sign(self, data: bytes, signature_algorithm: Any, /) -> bytes: ...


# -- RFC 7512 URIs ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """An RFC 7512 PKCS#11 URI naming one key: ``pkcs11:token=T;object=O[;type=private]``,
    optionally ``?module-path=/usr/lib/...so``. A PIN in the URI is refused."""

    token: str
    object: str
    module_path: str | None = None

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        """Parse ``uri``; CAError naming what is wrong."""
        if not uri.startswith("pkcs11:"):
            raise CAError(f"PKCS#11 URI {uri!r} must start with 'pkcs11:' (RFC 7512)")
        path, _, query = uri[len("pkcs11:") :].partition("?")
        attributes = _attributes(uri, path, ";", _PATH_ATTRIBUTES)
        options = _attributes(uri, query, "&", _QUERY_ATTRIBUTES | {"pin-value"})
        if "pin-value" in options:
            raise CAError(
                f"PKCS#11 URI {_without_query(uri)} carries a PIN: give it in a 0600 file "
                "(CERTFLEET_CA_PIN_FILE) or CERTFLEET_CA_PIN, never in the URI"
            )
        if attributes.get("type", "private") != "private":
            raise CAError(f"PKCS#11 URI {uri!r} must name a private key (type=private)")
        for required in ("token", "object"):
            if not attributes.get(required):
                raise CAError(f"PKCS#11 URI {uri!r} names no {required}= (RFC 7512)")
        return cls(attributes["token"], attributes["object"], options.get("module-path"))

    def __str__(self) -> str:
        text = f"pkcs11:token={quote(self.token, safe='')};object={quote(self.object, safe='')}"
        text += ";type=private"
        if self.module_path:
            text += f"?module-path={quote(self.module_path, safe='/')}"
        return text


def _without_query(uri: str) -> str:
    return uri.partition("?")[0]


def _attributes(uri: str, text: str, separator: str, known: frozenset[str]) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for part in filter(None, text.split(separator)):
        name, equals, value = part.partition("=")
        if not equals or name not in known:
            raise CAError(
                f"PKCS#11 URI {_without_query(uri)!r}: {name!r} is not an attribute certfleet "
                f"reads (known: {', '.join(sorted(known - {'pin-value'}))})"
            )
        if name in attributes:
            raise CAError(f"PKCS#11 URI {_without_query(uri)!r} names {name} twice")
        attributes[name] = unquote(value)
    return attributes


# -- a private key held by a token --------------------------------------------------------


class TokenKey(ec.EllipticCurvePrivateKey):
    """An EC private key inside a PKCS#11 token: ``cryptography``'s builders sign with it as
    with a file key; the key itself never leaves the token (``private_bytes`` refuses).

    One PKCS#11 session per process, shared by the threads that sign through one lock (a
    session must not run two operations at once).
    """

    def __init__(self, uri: Pkcs11Uri, handle: Any, public_key: ec.EllipticCurvePublicKey):
        self.uri = uri
        self._handle = handle
        self._public_key = public_key
        self._lock = threading.Lock()

    def sign(self, data: bytes | bytearray | memoryview, signature_algorithm: Any) -> bytes:
        """An ECDSA signature (DER) over ``data``: hashed here, signed in the token."""
        from pkcs11 import Mechanism

        if not isinstance(signature_algorithm, ec.ECDSA) or isinstance(
            signature_algorithm.algorithm, utils.Prehashed
        ):
            raise CAError("a token key signs ECDSA over data with a named hash only")
        hasher = hashes.Hash(signature_algorithm.algorithm)
        hasher.update(bytes(data))
        digest = hasher.finalize()
        with self._lock:
            raw: bytes = self._handle.sign(digest, mechanism=Mechanism.ECDSA)
        half = len(raw) // 2
        return utils.encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise CAError(f"{self.uri} is a signing key; it does no key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise CAError(f"{self.uri} is in a PKCS#11 token and cannot be exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,  # noqa: A002 (the ABC's name)
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise CAError(f"{self.uri} is in a PKCS#11 token and cannot be exported")

    def __copy__(self) -> TokenKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenKey:
        return self

    def __repr__(self) -> str:
        return f"TokenKey({self.uri})"


def _library(module: str) -> Any:
    import pkcs11
    from pkcs11.exceptions import PKCS11Error

    try:
        return pkcs11.lib(module)
    except PKCS11Error:
        raise CAError(
            f"PKCS#11 module {module} cannot be loaded: check the path "
            "(--pkcs11-module, CERTFLEET_CA_PKCS11_MODULE or the URI's module-path)"
        ) from None


def _session(module: str, token_label: str, pin: bytes, *, rw: bool = False) -> Any:
    """A logged-in session on the token labelled ``token_label``; CAError for a missing
    token or a wrong PIN, one line each (never the PIN)."""
    from pkcs11.exceptions import (
        MultipleTokensReturned,
        NoSuchToken,
        PinIncorrect,
        PinLenRange,
        PinLocked,
        PKCS11Error,
        UserAlreadyLoggedIn,
    )

    library = _library(module)
    try:
        token = library.get_token(token_label=token_label)
    except NoSuchToken:
        raise CAError(
            f"no PKCS#11 token labelled {token_label!r} in {module}: check the label "
            "(softhsm2-util --show-slots lists them)"
        ) from None
    except MultipleTokensReturned:
        raise CAError(
            f"more than one PKCS#11 token is labelled {token_label!r} in {module}"
        ) from None
    try:
        return token.open(rw=rw, user_pin=pin.decode("utf-8"))
    except UserAlreadyLoggedIn:
        # PKCS#11 logs in per process, not per session: this process already has.
        return token.open(rw=rw)
    except (PinIncorrect, PinLenRange):
        raise CAError(
            f"wrong PIN for PKCS#11 token {token_label!r}: check CERTFLEET_CA_PIN_FILE "
            "(or CERTFLEET_CA_PIN)"
        ) from None
    except PinLocked:
        raise CAError(f"the PIN of PKCS#11 token {token_label!r} is locked") from None
    except PKCS11Error as exc:
        raise CAError(f"cannot open PKCS#11 token {token_label!r}: {type(exc).__name__}") from None


def open_token_key(
    uri: Pkcs11Uri,
    *,
    module: str,
    pin: bytes,
    expected_public_key: PublicKey | None = None,
) -> TokenKey:
    """The token's private key ``uri`` names, checked by a test signature against
    ``expected_public_key`` (the CA certificate's) or, without one, the token's public
    object of the same label. CAError for a missing token, wrong PIN, missing object or a
    key that does not belong to the certificate."""
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import MultipleObjectsReturned, NoSuchKey
    from pkcs11.util.ec import encode_ec_public_key

    session = _session(module, uri.token, pin)
    try:
        # The token object only (CKA_TOKEN): this process's session copies share its label.
        found = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.LABEL: uri.object,
                    Attribute.TOKEN: True,
                }
            )
        )
        if not found:
            raise NoSuchKey
        if len(found) > 1:
            raise MultipleObjectsReturned
        handle = found[0]
        if expected_public_key is None:
            public = session.get_key(ObjectClass.PUBLIC_KEY, label=uri.object)
            expected_public_key = serialization.load_der_public_key(  # type: ignore[assignment]
                encode_ec_public_key(public)
            )
    except NoSuchKey:
        raise CAError(
            f"PKCS#11 token {uri.token!r} holds no key labelled {uri.object!r} "
            f"({_without_query(str(uri))}): check the URI's object="
        ) from None
    except MultipleObjectsReturned:
        raise CAError(
            f"PKCS#11 token {uri.token!r} holds more than one key labelled {uri.object!r}"
        ) from None
    if not isinstance(expected_public_key, ec.EllipticCurvePublicKey):
        raise CAError(f"{uri} is not an EC key: certfleet's token keys are P-256 or P-384")
    if handle[Attribute.EXTRACTABLE] or not handle[Attribute.SENSITIVE]:
        raise CAError(f"{uri} is extractable or not sensitive: a CA key must stay in its token")
    key = TokenKey(uri, _session_copy(handle, uri), expected_public_key)
    probe = secrets.token_bytes(32)
    try:
        expected_public_key.verify(
            key.sign(probe, ec.ECDSA(hashes.SHA256())), probe, ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        raise CAError(
            f"{uri} does not belong to the CA certificate it is meant to sign for"
        ) from None
    return key


def _session_copy(handle: Any, uri: Pkcs11Uri) -> Any:
    """The key to sign with: a copy of the token object as a *session object* of this
    process's session (C_CopyObject with CKA_TOKEN false), inside the token, as sensitive and
    non-extractable as the original (PKCS#11 never lets a copy loosen them; checked). SoftHSM2's
    file store re-reads a token object's files on every C_SignInit (2 openat + locks per
    signature); a session object lives in the module's memory. A module that refuses the copy
    (CKA_COPYABLE false) signs with the token object itself."""
    from pkcs11 import Attribute
    from pkcs11.exceptions import PKCS11Error

    try:
        copy = handle.copy({Attribute.TOKEN: False})
    except PKCS11Error as exc:
        log.info(
            "pkcs11 key not copied to a session object uri=%s error=%s", uri, type(exc).__name__
        )
        return handle
    if copy[Attribute.EXTRACTABLE] or not copy[Attribute.SENSITIVE]:
        copy.destroy()
        return handle
    return copy


def generate_token_keys(
    *, module: str, token_label: str, pin: bytes, key_algorithm: str
) -> dict[str, TokenKey]:
    """Generate the root, issuing and OCSP keys in the token (non-extractable, sensitive,
    signing only); refuse when the token already holds any of their labels."""
    from pkcs11 import Attribute

    if key_algorithm not in _CURVES:
        raise CAError(
            f"a PKCS#11 CA key is {' or '.join(_CURVES)}; --key-algorithm {key_algorithm} "
            "is for file keys only"
        )
    session = _session(module, token_label, pin, rw=True)
    for label in TOKEN_LABELS.values():
        if any(True for _ in session.get_objects({Attribute.LABEL: label})):
            raise CAError(
                f"PKCS#11 token {token_label!r} already holds {label!r}: a CA was created "
                "with it before; use another token (nothing was generated)"
            )
    return {
        role: _generate_in(session, module, token_label, label, key_algorithm)
        for role, label in TOKEN_LABELS.items()
    }


def generate_token_key(
    *, module: str, token_label: str, pin: bytes, key_algorithm: str, label: str
) -> TokenKey:
    """Generate one CA key labelled ``label`` in the token (``ca rollover``: the next issuing
    CA's), non-extractable and sensitive; refuse when the token already holds that label."""
    from pkcs11 import Attribute

    session = _session(module, token_label, pin, rw=True)
    if any(True for _ in session.get_objects({Attribute.LABEL: label})):
        raise CAError(
            f"PKCS#11 token {token_label!r} already holds {label!r} (an interrupted "
            "rollover?): delete that object or use the next label (nothing was generated)"
        )
    return _generate_in(session, module, token_label, label, key_algorithm)


def _generate_in(
    session: Any, module: str, token_label: str, label: str, key_algorithm: str
) -> TokenKey:
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    if key_algorithm not in _CURVES:
        raise CAError(
            f"a PKCS#11 CA key is {' or '.join(_CURVES)}; --key-algorithm {key_algorithm} "
            "is for file keys only"
        )
    curve_name, _ = _CURVES[key_algorithm]
    parameters = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve_name)}, local=True
    )
    public, private = parameters.generate_keypair(
        store=True,
        label=label,
        id=secrets.token_bytes(8),
        private_template={
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.PRIVATE: True,
            Attribute.SIGN: True,
            Attribute.DECRYPT: False,
            Attribute.UNWRAP: False,
            Attribute.DERIVE: False,
        },
    )
    public_key = serialization.load_der_public_key(encode_ec_public_key(public))
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    uri = Pkcs11Uri(token_label, label, module)
    return TokenKey(uri, _session_copy(private, uri), public_key)


# -- where the CA's keys are: the record, the settings, a source a worker can open ----------


class CaKeySettings(BaseSettings):
    """Where the CA keys are when not in the data folder's PEM files (module doc)."""

    model_config = SettingsConfigDict(env_prefix="CERTFLEET_", extra="ignore")

    #: ``pkcs11:token=...;object=...`` (RFC 7512) or a PEM file: the issuing CA's key.
    ca_issuing_key: str | None = None
    #: ``pkcs11:`` URI of the OCSP responder's key (default: the one recorded at init).
    ca_ocsp_key: str | None = None
    #: The PKCS#11 module when a URI names none (default: the one recorded at init).
    ca_pkcs11_module: str | None = None
    #: File whose first line is the token's user PIN (0600), instead of CERTFLEET_CA_PIN.
    ca_pin_file: Path | None = None
    ca_pin: SecretStr | None = None


def build_key_settings(**overrides: Any) -> CaKeySettings:
    """The key settings from the environment (and flags as keyword overrides)."""
    return settings_from_env(CaKeySettings, "CA key", overrides)


@dataclass(frozen=True)
class TokenKeyRecord:
    """What ``ca init`` records in ``ca.json`` about token keys: module, URIs, PIN file; and
    after ``ca rollover`` the earlier issuing CAs' keys (``previous``: key id -> URI)."""

    module: str
    uris: dict[str, str]
    pin_file: str | None
    previous: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "store": "pkcs11",
            "module": self.module,
            **self.uris,
            "pin_file": self.pin_file,
        }
        if self.previous:
            body["previous_issuing"] = dict(self.previous)
        return body

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> TokenKeyRecord | None:
        if not value or value.get("store") != "pkcs11":
            return None
        uris = {role: str(value[role]) for role in TOKEN_LABELS if value.get(role)}
        pin_file = value.get("pin_file")
        previous = value.get("previous_issuing") or {}
        return cls(
            str(value["module"]),
            uris,
            str(pin_file) if pin_file else None,
            {str(key_id): str(uri) for key_id, uri in dict(previous).items()},
        )

    def rolled_over(self, old_key_id: str, new_uri: str) -> TokenKeyRecord:
        """The record after ``ca rollover``: ``new_uri`` is the issuing key, the one it
        replaces is kept under ``old_key_id``."""
        previous = dict(self.previous)
        if "issuing" in self.uris:
            previous[old_key_id] = self.uris["issuing"]
        return TokenKeyRecord(
            self.module, {**self.uris, "issuing": new_uri}, self.pin_file, previous
        )


def token_pin(settings: CaKeySettings, record: TokenKeyRecord | None) -> bytes:
    """The token's PIN: CERTFLEET_CA_PIN_FILE, else CERTFLEET_CA_PIN, else the PIN file
    recorded at init. Files must be 0600."""
    if settings.ca_pin_file is not None:
        if secret_bytes(settings.ca_pin) is not None:
            raise CAError("both CERTFLEET_CA_PIN and CERTFLEET_CA_PIN_FILE are set; keep only one")
        return read_secret_file(settings.ca_pin_file, "PIN file")
    pin = secret_bytes(settings.ca_pin)
    if pin is not None:
        return pin
    if record is not None and record.pin_file:
        return read_secret_file(Path(record.pin_file), "PIN file (recorded by ca init)")
    raise CAError(
        "the CA keys are in a PKCS#11 token and no PIN is given: set CERTFLEET_CA_PIN_FILE "
        "(a 0600 file) or CERTFLEET_CA_PIN"
    )


@dataclass(frozen=True)
class KeySource:
    """How to open the issuing key in another process (a minting worker): the PEM of a file
    key, or a token URI, module and PIN. Pickled to the worker; its repr shows no secret."""

    pem: bytes | None = field(default=None, repr=False)
    uri: str | None = None
    module: str | None = None
    pin: bytes | None = field(default=None, repr=False)
    public_key_der: bytes | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls, key: PrivateKey, *, module: str | None = None, pin: bytes | None = None
    ) -> KeySource:
        if isinstance(key, TokenKey):
            public_der = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            return cls(
                uri=str(key.uri),
                module=module or key.uri.module_path,
                pin=pin,
                public_key_der=public_der,
            )
        return cls(pem=private_key_pem(key))

    def open(self) -> PrivateKey:
        """The key, in this process."""
        if self.pem is not None:
            from factory.keys import load_private_key_pem

            return load_private_key_pem(self.pem)
        assert self.uri is not None and self.module is not None and self.pin is not None
        public = (
            serialization.load_der_public_key(self.public_key_der) if self.public_key_der else None
        )
        return open_token_key(
            Pkcs11Uri.parse(self.uri),
            module=self.module,
            pin=self.pin,
            expected_public_key=public,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class CaKeys:
    """Where this CA's keys are: the record ``ca init`` wrote (None: PEM files) under the
    settings, which win."""

    record: TokenKeyRecord | None
    settings: CaKeySettings

    def module_for(self, uri: Pkcs11Uri) -> str:
        """The PKCS#11 module that opens ``uri``."""
        return self._module(uri)

    def _module(self, uri: Pkcs11Uri) -> str:
        module = (
            uri.module_path
            or self.settings.ca_pkcs11_module
            or (self.record.module if self.record is not None else None)
        )
        if not module:
            raise CAError(
                f"no PKCS#11 module for {uri}: set CERTFLEET_CA_PKCS11_MODULE or add "
                "?module-path=... to the URI"
            )
        return module

    def _uri(self, role: str, configured: str | None) -> str | None:
        if configured:
            return configured
        if self.record is not None:
            return self.record.uris.get(role)
        return None

    def open_issuing(
        self, default_file: Path, public_key: PublicKey, passphrase: bytes | None
    ) -> tuple[PrivateKey, KeySource]:
        """The issuing key and how a worker process opens it again."""
        from factory.keys import load_private_key

        configured = self._uri("issuing", self.settings.ca_issuing_key)
        if configured is None or not configured.startswith("pkcs11:"):
            path = Path(configured) if configured else default_file
            key = load_private_key(path, passphrase)
            if key.public_key() != public_key:
                raise CAError(f"{path} does not belong to the issuing CA certificate")
            return key, KeySource.of(key)
        uri = Pkcs11Uri.parse(configured)
        module = self._module(uri)
        pin = token_pin(self.settings, self.record)
        token_key = open_token_key(uri, module=module, pin=pin, expected_public_key=public_key)
        return token_key, KeySource.of(token_key, module=module, pin=pin)

    def open_token(self, uri_text: str, public_key: PublicKey) -> TokenKey:
        """The token key ``uri_text`` names, checked against ``public_key``."""
        uri = Pkcs11Uri.parse(uri_text)
        return open_token_key(
            uri,
            module=self._module(uri),
            pin=token_pin(self.settings, self.record),
            expected_public_key=public_key,
        )

    def open_root(
        self, default_file: Path, public_key: PublicKey, passphrase: bytes | None
    ) -> PrivateKey:
        """The root key (``ca rollover``, ``ca revoke-issuing``): the token's recorded at
        init, else ``ca/root.key``."""
        from factory.keys import load_private_key

        uri = self.record.uris.get("root") if self.record is not None else None
        if uri is None:
            key = load_private_key(default_file, passphrase)
            if key.public_key() != public_key:
                raise CAError(f"{default_file} does not belong to the root certificate")
            return key
        return self.open_token(uri, public_key)

    def open_ocsp(self) -> TokenKey | None:
        """The OCSP responder's token key; None when OCSP answers with a file key."""
        configured = self._uri("ocsp", self.settings.ca_ocsp_key)
        if configured is None:
            return None
        uri = Pkcs11Uri.parse(configured)
        return open_token_key(
            uri, module=self._module(uri), pin=token_pin(self.settings, self.record)
        )
