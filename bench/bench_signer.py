"""The CA signer with keys in a PKCS#11 token (SoftHSM2) next to file keys, in one run.

    flock /tmp/certfleet-cpu.lock .venv/bin/python bench/bench_signer.py \
        [--count 5000] [--rounds 2] [--crl-entries 10000] [--seconds 5]

- minting: ``certfleet factory provision --count N`` as a subprocess (the default workers,
  one per CPU, each with its own token session), a file-key CA and a token-key CA taking
  turns (which goes first alternates) in fresh data folders, ``--rounds`` times each;
  devices/s from the command's own summary;
- CRL: a CRL of ``--crl-entries`` revoked serials built and signed over and over for
  ``--seconds``, with the issuing key in the token and in a file;
- OCSP: the registry's responder (:class:`registry.ocsp.OcspResponder`, SQLite) answering
  requests for ``--seconds``, its responder key in the token and in a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from factory.ca import CertificateAuthority, TokenInit
from fleetcore.layout import DataLayout
from fleetcore.profile import IdentityKind, PrivateKey

CERTFLEET = [sys.executable, "-m", "certfleet.cli"]
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "bench-pin-1234"


def make_token(folder: Path) -> tuple[dict[str, str], Path]:
    tokens = folder / "tokens"
    tokens.mkdir(parents=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "bench"]
        + ["--pin", PIN, "--so-pin", "so-" + PIN],
        env=env,
        check=True,
        capture_output=True,
    )
    pin_file = folder / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return env, pin_file


def mint(layout: DataLayout, count: int, env: dict[str, str]) -> float:
    result = subprocess.run(
        [*CERTFLEET, "factory", "provision", "--count", str(count)]
        + ["--data-dir", str(layout.root), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(result.stdout)["devices_per_s"])


def crl_rate(key: PrivateKey, issuer: x509.Certificate, entries: int, seconds: float) -> float:
    now = dt.datetime.now(dt.UTC)
    revoked = [
        x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        for serial in range(1, entries + 1)
    ]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        builder = x509.CertificateRevocationListBuilder(
            issuer_name=issuer.subject,
            last_update=now,
            next_update=now + dt.timedelta(days=1),
            revoked_certificates=revoked,
        )
        builder.sign(key, hashes.SHA256())
        done += 1
    return done / (time.perf_counter() - start)


def ocsp_rate(ca: CertificateAuthority, folder: Path, seconds: float) -> float:
    from registry.db import make_engine, migrate
    from registry.ocsp import OcspResponder
    from registry.settings import RegistrySettings

    engine = make_engine(
        RegistrySettings(data_dir=folder, registry_database_url=f"sqlite:///{folder / 'r.db'}")
    )
    migrate(engine)
    leaf = ca.issue_client(ca.identity(IdentityKind.DEVICE, "dev-ocsp")).certificate
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, ca.issuing_cert, hashes.SHA1())  # noqa: S303 (what OpenSSL sends)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    responder = OcspResponder(ca, engine)
    responder.respond(request)  # issues the responder certificate once
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        responder.respond(request)
        done += 1
    engine.dispose()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--crl-entries", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    options = parser.parse_args()
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        sys.exit("softhsm2 not installed (apt-get install softhsm2)")
    scratch = Path(tempfile.mkdtemp(prefix="bench-signer-"))
    try:
        env, pin_file = make_token(scratch / "hsm")
        rates: dict[str, list[float]] = {"file": [], "token": []}
        layouts = {kind: DataLayout(scratch / kind) for kind in rates}
        CertificateAuthority.init(layouts["file"], "fleet.bench")
        CertificateAuthority.init(
            layouts["token"],
            "fleet.bench",
            token=TokenInit(MODULE, "bench", PIN.encode(), pin_file),
        )
        # Fresh folders per run (a copy of the CA's folder), nothing deleted until the end:
        # ext4 allocates inodes slowly next to ones freed minutes before (bench_factory.py).
        for round_no in range(options.rounds):
            order = ("token", "file") if round_no % 2 else ("file", "token")
            for kind in order:
                layout = DataLayout(scratch / f"{kind}-{round_no}")
                shutil.copytree(layouts[kind].ca_dir, layout.ca_dir)
                rates[kind].append(mint(layout, options.count, env))
        token_ca = CertificateAuthority.load(layouts["token"])
        file_ca = CertificateAuthority.load(layouts["file"])
        results = {
            "count": options.count,
            "mint_file_per_s": rates["file"],
            "mint_token_per_s": rates["token"],
            "mint_ratio": sum(rates["token"]) / sum(rates["file"]),
            "crl_entries": options.crl_entries,
            "crl_file_per_s": crl_rate(
                file_ca.issuing_key, file_ca.issuing_cert, options.crl_entries, options.seconds
            ),
            "crl_token_per_s": crl_rate(
                token_ca.issuing_key, token_ca.issuing_cert, options.crl_entries, options.seconds
            ),
            "ocsp_file_per_s": ocsp_rate(file_ca, layouts["file"].root, options.seconds),
            "ocsp_token_per_s": ocsp_rate(token_ca, layouts["token"].root, options.seconds),
        }
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
