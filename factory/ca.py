"""The certfleet CA: a self-signed root and an issuing intermediate, on disk in ``<data>/ca``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory.crl import RevokedEntry, build_crl_der, without_der
from factory.errors import CAError
from factory.issuers import (
    Issuer,
    authority_key_id,
    issuer_key_id,
    previous_issuer_paths,
    read_meta,
    write_trust,
)
from factory.signer import (
    TOKEN_LABELS,
    CaKeys,
    CaKeySettings,
    KeySource,
    Pkcs11Uri,
    TokenKey,
    TokenKeyRecord,
    build_key_settings,
    generate_token_key,
    generate_token_keys,
    token_pin,
)
from fleetcore.cert_builders import (
    ClientCertificateTemplate,
    build_ca_certificate,
    build_ocsp_responder_certificate,
    build_server_certificate,
)
from fleetcore.clock import utcnow
from fleetcore.keys import generate_key, private_key_pem
from fleetcore.layout import DataLayout, write_private, write_public
from fleetcore.profile import (
    CLOCK_SKEW,
    Identity,
    IdentityKind,
    OperatorRole,
    PrivateKey,
    PublicKey,
    certificate_pem,
    check_public_key,
)
from fleetcore.publication import check_publish_url

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "RevokedEntry",
    "TokenInit",
    "write_issued",
]

log = logging.getLogger(__name__)

#: A loaded CA looks at ``issuing.crt`` at most this often to follow a rollover made by
#: another process (``certfleet ca rollover`` while the registry runs).
REFRESH_S = 1.0

ROOT_LIFETIME = dt.timedelta(days=20 * 365)
ISSUING_LIFETIME = dt.timedelta(days=10 * 365)
DEFAULT_SERVER_LIFETIME = dt.timedelta(days=397)
DEFAULT_CLIENT_LIFETIME = dt.timedelta(days=365)


@dataclass(frozen=True)
class IssuedCertificate:
    """A freshly issued leaf and its private key (None when signed from a CSR)."""

    certificate: x509.Certificate
    private_key: PrivateKey | None

    @property
    def certificate_pem(self) -> bytes:
        return certificate_pem(self.certificate)


@dataclass(frozen=True)
class TokenInit:
    """``ca init --pkcs11-module LIB --pkcs11-token LABEL --pin-file FILE``: generate the CA
    keys in that token. The PIN is read from the file (0600) and never stored elsewhere."""

    module: str
    token_label: str
    pin: bytes = dataclasses.field(repr=False)
    pin_file: Path | None = None


@dataclass(frozen=True)
class LoadedIssuing:
    """The issuing CA as one load read it: the issuer, its key's source and file stamps."""

    current: Issuer
    source: KeySource | None
    stamp: tuple[int, int] | None
    issuers_stamp: int


class CertificateAuthority:
    """Root + issuing CA loaded in memory. Create with :meth:`init`, open with :meth:`load`.

    Every signature goes through ``issuing_key``, a :mod:`factory.signer` key: a file key or
    a PKCS#11 token key.
    """

    def __init__(
        self,
        *,
        layout: DataLayout,
        trust_domain: str,
        root_cert: x509.Certificate,
        issuing_cert: x509.Certificate,
        issuing_key: PrivateKey,
        publish_url: str | None = None,
        issuing_source: KeySource | None = None,
        keys: CaKeys | None = None,
    ) -> None:
        self.layout = layout
        self.trust_domain = trust_domain
        self.root_cert = root_cert
        self._current = Issuer(issuing_cert, issuing_key)
        #: earlier issuing CAs still trusted after a rollover (:mod:`factory.issuers`).
        self.previous: tuple[Issuer, ...] = ()
        self._passphrase: bytes | None = None
        self._key_settings: CaKeySettings | None = None
        self._stamp: tuple[int, int] | None = None  # issuing.crt (inode, mtime) when watched
        self._issuers_stamp = 0
        self._checked_at = 0.0
        self._refresh_lock = threading.Lock()
        #: base URL of the CRL and OCSP responder written into every new certificate.
        self.publish_url = publish_url
        self._client_template: ClientCertificateTemplate | None = None
        self._issuing_source = issuing_source
        #: where the keys are (None: created here, or PEM files).
        self.keys = keys

    # -- the current issuing CA, and earlier ones after a rollover -------------------------

    @property
    def issuing_cert(self) -> x509.Certificate:
        """The current issuing CA's certificate: every new certificate is signed by it."""
        return self._issuer().certificate

    @property
    def issuing_key(self) -> PrivateKey:
        return self._issuer().key

    @property
    def issuers(self) -> tuple[Issuer, ...]:
        """The current issuing CA first, then the earlier ones still trusted."""
        current = self._issuer()
        return (current, *self.previous)

    def trusted_issuer_certs(self) -> list[x509.Certificate]:
        """The certificates of :attr:`issuers`: what a device certificate may be signed by."""
        return [issuer.certificate for issuer in self.issuers]

    def issuer_of(self, certificate: x509.Certificate) -> Issuer | None:
        """The trusted issuing CA that signed ``certificate`` (by its AKI), or None."""
        key_id = authority_key_id(certificate)
        for issuer in self.issuers:
            if issuer.key_id == key_id:
                return issuer
        return None

    def issuer_by_key_id(self, key_id: str) -> Issuer | None:
        for issuer in self.issuers:
            if issuer.key_id == key_id.lower():
                return issuer
        return None

    def _issuer(self) -> Issuer:
        if self._stamp is not None and time.monotonic() - self._checked_at >= REFRESH_S:
            self.refresh()
        return self._current

    def _disk_stamp(self) -> tuple[int, int]:
        stat = os.stat(self.layout.issuing_cert)
        return stat.st_ino, stat.st_mtime_ns

    def refresh(self) -> bool:
        """Follow a rollover or retirement made by another process: when ``issuing.crt`` or
        the earlier issuing CAs changed, load them again. True when something changed."""
        with self._refresh_lock:
            self._checked_at = time.monotonic()
            try:
                stamp = self._disk_stamp()
                issuers_stamp = (
                    self.layout.issuers_dir.stat().st_mtime_ns
                    if self.layout.issuers_dir.exists()
                    else 0
                )
            except OSError:
                return False
            if (stamp, issuers_stamp) == (self._stamp, self._issuers_stamp):
                return False
            try:
                fresh = CertificateAuthority.load(
                    self.layout, passphrase=self._passphrase, key_settings=self._key_settings
                )
            except CAError as exc:
                log.error("issuing CA not reloaded after a change on disk: %s", exc)
                self._stamp, self._issuers_stamp = stamp, issuers_stamp
                return False
            loaded = fresh.loaded_issuing()
            changed = issuer_key_id(loaded.current.certificate) != issuer_key_id(
                self._current.certificate
            )
            self._current = loaded.current
            self.previous = fresh.previous
            self._client_template = None
            self._issuing_source = loaded.source
            self._stamp, self._issuers_stamp = loaded.stamp, loaded.issuers_stamp
            log.info(
                "issuing CA reloaded key_id=%s previous=%s new_issuer=%s",
                self._current.key_id[:16],
                ",".join(issuer.key_id[:16] for issuer in self.previous) or "-",
                changed,
            )
            return True

    def loaded_issuing(self) -> LoadedIssuing:
        """What this CA read of its issuing CA from disk (a running CA takes it over when
        the files changed)."""
        return LoadedIssuing(self._current, self._issuing_source, self._stamp, self._issuers_stamp)

    def watch_files(self, passphrase: bytes | None, key_settings: CaKeySettings | None) -> None:
        """Reload the issuing CA when its files change on disk (checked at most once a second)."""
        self._passphrase = passphrase
        self._key_settings = key_settings
        self._stamp = self._disk_stamp()
        self._issuers_stamp = (
            self.layout.issuers_dir.stat().st_mtime_ns if self.layout.issuers_dir.exists() else 0
        )
        self._checked_at = time.monotonic()

    @property
    def issuing_source(self) -> KeySource:
        """How another process (a minting worker) opens the issuing key."""
        if self._issuing_source is None:
            self._issuing_source = KeySource.of(self.issuing_key)
        return self._issuing_source

    @property
    def ocsp_token_key(self) -> TokenKey | None:
        """The OCSP responder's key when it is in a token; None: a file key, made as needed."""
        return self.keys.open_ocsp() if self.keys is not None else None

    # -- creation and loading -------------------------------------------------------------

    @classmethod
    def init(
        cls,
        layout: DataLayout,
        trust_domain: str = "fleet.local",
        *,
        passphrase: bytes | None = None,
        key_algorithm: str = "p256",
        publish_url: str | None = None,
        token: TokenInit | None = None,
    ) -> CertificateAuthority:
        """Create a new root and issuing CA in ``layout.ca_dir``; refuse to overwrite one.

        With ``token`` the root, issuing and OCSP keys are generated in that PKCS#11 token
        and ``ca.json`` records where they are; otherwise they are PEM files (0600)."""
        Identity(trust_domain, IdentityKind.SERVICE, "probe")  # validates the trust domain
        if publish_url is not None:
            publish_url = check_publish_url(publish_url)
        if layout.root_cert.exists() or layout.root_key.exists():
            raise CAError(
                f"a CA already exists in {layout.ca_dir}; remove it first or choose another "
                "--data-dir (nothing was overwritten)"
            )
        now = utcnow()
        record: TokenKeyRecord | None = None
        root_key: PrivateKey
        issuing_key: PrivateKey
        if token is not None:
            token_keys = generate_token_keys(
                module=token.module,
                token_label=token.token_label,
                pin=token.pin,
                key_algorithm=key_algorithm,
            )
            root_key, issuing_key = token_keys["root"], token_keys["issuing"]
            record = TokenKeyRecord(
                token.module,
                {role: str(key.uri) for role, key in token_keys.items()},
                str(token.pin_file.resolve()) if token.pin_file is not None else None,
            )
        else:
            root_key, issuing_key = generate_key(key_algorithm), generate_key(key_algorithm)
        root_cert = build_ca_certificate(
            common_name=f"certfleet root CA ({trust_domain})",
            public_key=root_key.public_key(),
            issuer_key=root_key,
            issuer=None,
            not_before=now - CLOCK_SKEW,
            not_after=now + ROOT_LIFETIME,
            path_length=1,
        )
        issuing_cert = build_ca_certificate(
            common_name=f"certfleet issuing CA ({trust_domain})",
            public_key=issuing_key.public_key(),
            issuer_key=root_key,
            issuer=root_cert,
            not_before=now - CLOCK_SKEW,
            not_after=now + ISSUING_LIFETIME,
            path_length=0,
        )
        if record is None:
            write_private(layout.root_key, private_key_pem(root_key, passphrase))
            write_private(layout.issuing_key, private_key_pem(issuing_key, passphrase))
        pem = serialization.Encoding.PEM
        write_public(layout.issuing_cert, issuing_cert.public_bytes(pem))
        write_public(layout.chain, issuing_cert.public_bytes(pem) + root_cert.public_bytes(pem))
        write_public(layout.trust, issuing_cert.public_bytes(pem) + root_cert.public_bytes(pem))
        write_public(
            layout.ca_meta,
            json.dumps(
                {
                    "trust_domain": trust_domain,
                    "created_at": now.isoformat(),
                    "key_algorithm": key_algorithm,
                    "encrypted": bool(passphrase),
                    "publish_url": publish_url,
                    **({"keys": record.as_json()} if record is not None else {}),
                },
                indent=2,
            ).encode(),
        )
        # The root certificate is written last: its presence marks a complete CA.
        write_public(layout.root_cert, root_cert.public_bytes(pem))
        return cls(
            layout=layout,
            trust_domain=trust_domain,
            root_cert=root_cert,
            issuing_cert=issuing_cert,
            issuing_key=issuing_key,
            publish_url=publish_url,
            keys=CaKeys(record, build_key_settings()) if record is not None else None,
        )

    @classmethod
    def load(
        cls,
        layout: DataLayout,
        *,
        passphrase: bytes | None = None,
        key_settings: CaKeySettings | None = None,
    ) -> CertificateAuthority:
        """Open the CA in ``layout.ca_dir`` (the issuing key only; the root key stays where it
        is). Where the issuing key is: ``key_settings`` (default: the environment,
        ``CERTFLEET_CA_ISSUING_KEY`` ...), else the record of ``ca init``, else
        ``ca/issuing.key``."""
        if not layout.root_cert.exists():
            raise CAError(
                f"no CA in {layout.ca_dir}: run 'certfleet ca init' first, or pass --data-dir"
            )
        try:
            meta = json.loads(layout.ca_meta.read_text())
            trust_domain = str(meta["trust_domain"])
            publish_url = meta.get("publish_url")
            record = TokenKeyRecord.from_json(meta.get("keys"))
            root_cert = x509.load_pem_x509_certificate(layout.root_cert.read_bytes())
            issuing_cert = x509.load_pem_x509_certificate(layout.issuing_cert.read_bytes())
        except (OSError, ValueError, KeyError) as exc:
            raise CAError(f"CA files in {layout.ca_dir} are incomplete or corrupt: {exc}") from None
        keys = CaKeys(record, key_settings or build_key_settings())
        issuing_key, source = keys.open_issuing(
            layout.issuing_key, check_public_key(issuing_cert.public_key()), passphrase
        )
        ca = cls(
            layout=layout,
            trust_domain=trust_domain,
            root_cert=root_cert,
            issuing_cert=issuing_cert,
            issuing_key=issuing_key,
            publish_url=str(publish_url) if publish_url else None,
            issuing_source=source,
            keys=keys,
        )
        ca.previous = _load_previous(layout, issuer_key_id(issuing_cert), passphrase, keys)
        ca.watch_files(passphrase, key_settings)
        return ca

    # -- rollover -------------------------------------------------------------------------

    def root_key(self, passphrase: bytes | None = None) -> PrivateKey:
        """The root's key, for what only the root signs (a new issuing CA, the revocation
        of one): in the token when ``ca init`` put the keys there, else ``ca/root.key``."""
        keys = self.keys or CaKeys(None, build_key_settings())
        return keys.open_root(
            self.layout.root_key, check_public_key(self.root_cert.public_key()), passphrase
        )

    def rollover(self, *, passphrase: bytes | None = None) -> Issuer:
        """Make a new issuing CA under the same root and make it current (``certfleet ca
        rollover``). The one it replaces moves to ``issuers/`` and stays trusted (its CRL and
        OCSP go on) until retired. Needs the root key (``root.key``, or the token's). With
        token keys the new issuing key is generated in the same token (label
        ``certfleet-issuing-<generation>``) and ``ca.json`` records it, the old one's URI kept
        under its key id."""
        root_key = self.root_key(passphrase)
        meta = read_meta(self.layout)
        generation = int(str(meta.get("issuing_generation", 1))) + 1
        key_algorithm = str(meta.get("key_algorithm", "p256"))
        now = utcnow()
        record = self.keys.record if self.keys is not None else None
        new_key: PrivateKey
        new_source: KeySource | None = None
        if record is not None:
            # The CA's keys are in a token: so is the new one (generated there, never out).
            assert self.keys is not None
            token_uri = Pkcs11Uri.parse(record.uris.get("issuing") or record.uris["root"])
            module = self.keys.module_for(token_uri)
            pin = token_pin(self.keys.settings, record)
            new_key = generate_token_key(
                module=module,
                token_label=token_uri.token,
                pin=pin,
                key_algorithm=key_algorithm,
                label=f"{TOKEN_LABELS['issuing']}-{generation}",
            )
            new_source = KeySource.of(new_key, module=module, pin=pin)
        else:
            new_key = generate_key(key_algorithm)
        new_cert = build_ca_certificate(
            common_name=f"certfleet issuing CA {generation} ({self.trust_domain})",
            public_key=new_key.public_key(),
            issuer_key=root_key,
            issuer=self.root_cert,
            not_before=now - CLOCK_SKEW,
            not_after=min(now + ISSUING_LIFETIME, self.root_cert.not_valid_after_utc),
            path_length=0,
        )
        old = self._current
        pem = serialization.Encoding.PEM
        # The old issuing CA is copied to issuers/ first: a crash before issuing.crt is
        # replaced leaves a copy of the current CA there, which load() skips.
        old_path = self.layout.issuers_dir / f"{old.key_id}.crt"
        if record is None:
            write_private(old_path.with_suffix(".key"), self.layout.issuing_key.read_bytes())
        write_public(old_path, old.certificate.public_bytes(pem))
        meta["issuing_generation"] = generation
        if record is not None:
            # Where the keys are: the new issuing key's URI, the old one's under its key id.
            assert isinstance(new_key, TokenKey)
            record = record.rolled_over(old.key_id, str(new_key.uri))
            meta["keys"] = record.as_json()
            self.keys = CaKeys(record, self.keys.settings if self.keys else build_key_settings())
        else:
            write_private(self.layout.issuing_key, private_key_pem(new_key, passphrase))
        write_public(self.layout.ca_meta, json.dumps(meta, indent=2).encode())
        write_public(self.layout.issuing_cert, new_cert.public_bytes(pem))
        write_public(self.layout.chain, new_cert.public_bytes(pem) + self.root_pem)
        write_trust(self.layout)
        self._current = Issuer(new_cert, new_key)
        self.previous = (old, *self.previous)
        self._client_template = None
        self._issuing_source = new_source
        if self._stamp is not None:
            self.watch_files(passphrase, self._key_settings)
        return self._current

    # -- issuing --------------------------------------------------------------------------

    @property
    def chain_pem(self) -> bytes:
        """Issuing + root, PEM: served with every leaf."""
        pem = serialization.Encoding.PEM
        return self.issuing_cert.public_bytes(pem) + self.root_cert.public_bytes(pem)

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    def identity(self, kind: IdentityKind, name: str) -> Identity:
        return Identity(self.trust_domain, kind, name)

    def issue_client(
        self,
        identity: Identity,
        *,
        public_key: PublicKey | None = None,
        not_after: dt.datetime | None = None,
        not_before: dt.datetime | None = None,
        serial: int | None = None,
        key_algorithm: str = "p256",
        role: OperatorRole | None = None,
    ) -> IssuedCertificate:
        """Issue a device, service or operator certificate (an operator's with ``role``).

        Without ``public_key`` a new key is generated (the factory-minted mode).
        """
        if identity.trust_domain != self.trust_domain:
            raise CAError(
                f"identity {identity.uri} is outside this CA's trust domain {self.trust_domain}"
            )
        now = utcnow()
        private_key: PrivateKey | None = None
        if public_key is None:
            private_key = generate_key(key_algorithm)
            public_key = private_key.public_key()
        if self._client_template is None:
            self._client_template = ClientCertificateTemplate(
                self.issuing_cert, self.issuing_key, publish_url=self.publish_url
            )
        certificate = self._client_template.build(
            identity=identity,
            public_key=public_key,
            not_before=not_before or now - CLOCK_SKEW,
            not_after=not_after or now + DEFAULT_CLIENT_LIFETIME,
            serial=serial,
            role=role,
        )
        return IssuedCertificate(certificate, private_key)

    def issue_server(
        self,
        name: str,
        *,
        dns_names: list[str],
        ip_addresses: list[str],
        lifetime: dt.timedelta = DEFAULT_SERVER_LIFETIME,
    ) -> IssuedCertificate:
        """Issue a TLS server certificate (broker, registry) with a new key."""
        now = utcnow()
        private_key = generate_key("p256")
        certificate = build_server_certificate(
            name=name,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            public_key=private_key.public_key(),
            issuer_cert=self.issuing_cert,
            issuer_key=self.issuing_key,
            not_before=now - CLOCK_SKEW,
            not_after=now + lifetime,
            publish_url=self.publish_url,
        )
        return IssuedCertificate(certificate, private_key)

    def issue_ocsp_responder(
        self, name: str, *, lifetime: dt.timedelta, public_key: PublicKey | None = None
    ) -> IssuedCertificate:
        """Issue a delegated OCSP responder certificate (OCSPSigning): for ``public_key`` (a
        token's key), or with a new file key."""
        now = utcnow()
        private_key: PrivateKey | None = None
        if public_key is None:
            private_key = generate_key("p256")
            public_key = private_key.public_key()
        certificate = build_ocsp_responder_certificate(
            name=name,
            public_key=public_key,
            issuer_cert=self.issuing_cert,
            issuer_key=self.issuing_key,
            not_before=now - CLOCK_SKEW,
            not_after=now + lifetime,
        )
        return IssuedCertificate(certificate, private_key)

    def build_crl_der(
        self,
        revoked: Sequence[RevokedEntry],
        *,
        next_update: dt.timedelta = dt.timedelta(hours=24),
        crl_number: int = 1,
        delta_of: int | None = None,
    ) -> tuple[x509.CertificateRevocationList, bytes]:
        """A CRL signed by the issuing CA listing ``revoked``, and its DER; with
        ``delta_of`` (the base's CRL number) a delta CRL (:func:`factory.crl.build_crl_der`)."""
        return build_crl_der(
            self.issuing_cert,
            self.issuing_key,
            revoked,
            next_update=next_update,
            crl_number=crl_number,
            publish_url=self.publish_url,
            delta_of=delta_of,
        )

    #: :meth:`build_crl_der`'s CRL alone (same arguments).
    build_crl = without_der(build_crl_der)


def _load_previous(
    layout: DataLayout, current_key_id: str, passphrase: bytes | None, keys: CaKeys
) -> tuple[Issuer, ...]:
    """The earlier issuing CAs of ``issuers/`` with their keys: a file beside the
    certificate, or the token key ``ca.json`` records under its key id."""
    from factory.keys import load_private_key

    previous: list[Issuer] = []
    for cert_path, key_path in previous_issuer_paths(layout):
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CAError(f"earlier issuing CA {cert_path} cannot be read: {exc}") from None
        key_id = issuer_key_id(certificate)
        if key_id == current_key_id:
            continue  # a rollover interrupted before issuing.crt was replaced
        token_uri = keys.record.previous.get(key_id) if keys.record is not None else None
        if token_uri is not None and not key_path.exists():
            public_key = check_public_key(certificate.public_key())
            previous.append(Issuer(certificate, keys.open_token(token_uri, public_key)))
            continue
        key = load_private_key(key_path, passphrase)
        if key.public_key() != certificate.public_key():
            raise CAError(f"{key_path} does not belong to {cert_path}")
        previous.append(Issuer(certificate, key))
    return tuple(previous)


def write_issued(
    issued: IssuedCertificate,
    cert_path: Path,
    key_path: Path,
    *,
    intermediate: x509.Certificate | None = None,
) -> None:
    """Write a leaf certificate (0644) and its key (0600).

    With ``intermediate`` the certificate file holds leaf + issuing CA, which is how server
    certificates are written so that clients trusting only ``root.crt`` can verify them.
    """
    if issued.private_key is not None:
        write_private(key_path, private_key_pem(issued.private_key))
    pem = issued.certificate_pem
    if intermediate is not None:
        pem += intermediate.public_bytes(serialization.Encoding.PEM)
    write_public(cert_path, pem)
