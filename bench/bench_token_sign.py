"""P-256 signatures per second of one token key (SoftHSM2), signing through the token object
itself (``token``) or through this process's session-object copy of it (``session``, what
:func:`factory.signer.open_token_key` does since issue 26).

    flock /tmp/certfleet-cpu.lock .venv/bin/python bench/bench_token_sign.py token|session [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import factory.signer as signer
from tests.softhsm import make_softhsm


def main() -> None:
    mode = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    hsm = make_softhsm(Path(tempfile.mkdtemp()))
    hsm.activate()
    pin = hsm.pin_file.read_text().strip().encode()
    if mode == "token":
        signer._session_copy = lambda handle, uri: handle  # the code before issue 26
    keys = signer.generate_token_keys(
        module=hsm.module, token_label=hsm.label, pin=pin, key_algorithm="p256"
    )
    key = keys["issuing"]
    started = time.perf_counter()
    for _ in range(count):
        key.sign(b"x" * 200, ec.ECDSA(hashes.SHA256()))
    print(f"{mode}: {count / (time.perf_counter() - started):.0f} signatures/s")


if __name__ == "__main__":
    main()
