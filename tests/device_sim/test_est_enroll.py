"""The zero-touch simulator's inputs: hardware serials and the claim folder (the enrollment
itself, against a real registry and broker: tests/e2e/test_lifecycle_registry.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.errors import BundleError, SimError
from device_sim.est_enroll import ClaimCredentials, enroll_fleet, hardware_serials


def test_serials_are_generated_from_a_prefix_and_an_index() -> None:
    assert hardware_serials("SN-", 3) == ["SN-000001", "SN-000002", "SN-000003"]


def test_serials_from_a_file_skip_comments_and_blanks_and_take_the_first_n(tmp_path: Path) -> None:
    file = tmp_path / "serials.txt"
    file.write_text("# line 7\nA1\n\n  B2  \nC3\n")
    assert hardware_serials("ignored-", 0, file) == ["A1", "B2", "C3"]
    assert hardware_serials("ignored-", 2, file) == ["A1", "B2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("A1\nA1\n", "twice"), ("has space\n", "printable"), ("# nothing\n", "no hardware serials")],
)
def test_bad_serial_files_are_refused_with_a_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    file = tmp_path / "serials.txt"
    file.write_text(text)
    with pytest.raises(SimError, match=message):
        hardware_serials("SN-", 0, file)


def test_a_claim_folder_without_its_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    for name in ("claim.crt", "chain.pem", "root.crt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(BundleError, match="lacks claim.key"):
        ClaimCredentials.load(tmp_path)


def test_the_est_url_must_be_https(tmp_path: Path) -> None:
    claim = ClaimCredentials("b", tmp_path / "c", tmp_path / "k", tmp_path / "ch", tmp_path / "r")
    with pytest.raises(SimError, match="must be https"):
        enroll_fleet(claim, "http://127.0.0.1:1", ["SN-1"], tmp_path, "127.0.0.1:8883")
