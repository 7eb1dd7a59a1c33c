"""Operations: --version, the TOML config file and its precedence, warnings about unknown
settings, the CA passphrase from a file, --log-format json.

``--version`` and ``--log-format json`` run through the console entry point in a subprocess;
the other commands, which check output, exit code and files, run in process with the same
clean ``CERTFLEET_*`` environment (tests/support/processes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fleetcore.config import unknown_settings
from fleetcore.errors import ConfigError
from fleetcore.layout import DataLayout
from registry.settings import RegistrySettings, build_settings
from tests.support.processes import certfleet_in_process

PASSPHRASE = "a long CA passphrase"


def certfleet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CERTFLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "certfleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


def in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`certfleet` without the interpreter start-up: same clean environment."""
    return certfleet_in_process(*args, env=env, unset_prefix="CERTFLEET_")


def secret_file(tmp_path: Path, text: str = PASSPHRASE + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    result = certfleet("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"certfleet {version('certfleet')}"


# -- the config file ---------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("CERTFLEET_"):
            monkeypatch.delenv(name)
    path = tmp_path / "certfleet.toml"
    path.write_text(
        'registry_addr = "127.0.0.1:7001"\n'
        "[registry]\n"
        "feed_max_wait = 30\n"
        'database_url = "sqlite:///from-file.db"\n'
    )
    monkeypatch.setenv("CERTFLEET_CONFIG", str(path))
    return path


def test_flags_win_over_environment_over_file_over_defaults(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_file = build_settings()
    assert from_file.registry_addr == "127.0.0.1:7001"
    assert from_file.registry_feed_max_wait == 30  # from the [registry] table
    assert from_file.registry_database_url == "sqlite:///from-file.db"
    assert from_file.registry_feed_poll_seconds == 1.0  # default: in neither
    monkeypatch.setenv("CERTFLEET_REGISTRY_ADDR", "127.0.0.1:7002")
    assert build_settings().registry_addr == "127.0.0.1:7002"
    assert build_settings(registry_addr="127.0.0.1:7003").registry_addr == "127.0.0.1:7003"
    assert build_settings().registry_feed_max_wait == 30  # the file still fills the rest


def test_a_bad_value_in_the_file_names_the_key_and_the_file(config: Path) -> None:
    config.write_text("[registry]\nfeed_max_wait = 600\n")
    with pytest.raises(ConfigError, match=f"registry_feed_max_wait in config file {config}"):
        build_settings()


def test_a_file_that_is_not_toml_is_one_line_from_the_console_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("registry_addr = \n")
    result = in_process("--config", str(bad), "ca", "init", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"config file {bad} is not valid TOML" in result.stderr
    missing = in_process("--config", str(tmp_path / "nope.toml"), "ca", "init")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "d").exists()


def test_the_config_file_feeds_every_command(tmp_path: Path) -> None:
    data = tmp_path / "from-config"
    path = tmp_path / "certfleet.toml"
    path.write_text(f'data_dir = "{data}"\ntrust_domain = "conf.test"\n')
    result = in_process("--config", str(path), "ca", "init", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trust_domain"] == "conf.test"
    assert DataLayout(data).root_cert.exists()


def test_unknown_keys_and_variables_are_warned_about_with_the_closest_name(
    tmp_path: Path,
) -> None:
    path = tmp_path / "certfleet.toml"
    path.write_text('registy_addr = "x"\n[broker]\nmetrics_adr = "y"\n')
    result = in_process(
        "--config",
        str(path),
        "ca",
        "init",
        "--data-dir",
        str(tmp_path / "d"),
        env={"CERTFLEET_REGISTRY_TOKN": "t", "CERTFLEET_BROKER_ADDR": "127.0.0.1:1"},
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "setting ignored" in line]
    assert len(warnings) == 3, result.stderr
    assert any("'registy_addr' (did you mean registry_addr?)" in w for w in warnings)
    assert any("'broker_metrics_adr' (did you mean broker_metrics_addr?)" in w for w in warnings)
    assert any(
        "CERTFLEET_REGISTRY_TOKN (did you mean CERTFLEET_REGISTRY_TOKEN?)" in w for w in warnings
    )


def test_unknown_settings_knows_every_field_and_the_non_setting_variables() -> None:
    assert (
        unknown_settings(
            [RegistrySettings],
            environ={"CERTFLEET_REGISTRY_ADDR": "a", "CERTFLEET_LOG_FORMAT": "json", "HOME": "/"},
            file_values={"registry_addr": "a"},
        )
        == []
    )


# -- the passphrase from a file ----------------------------------------------------------------


def test_ca_init_and_issue_take_the_passphrase_from_a_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secret = secret_file(tmp_path)
    init = in_process("ca", "init", "--data-dir", str(data), "--passphrase-file", str(secret))
    assert init.returncode == 0, init.stderr
    key = DataLayout(data).issuing_key.read_bytes()
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key, password=None)
    assert serialization.load_pem_private_key(key, password=PASSPHRASE.encode())

    refused = in_process(
        "ca", "issue-server", "--name", "web", "--ip", "127.0.0.1", "--data-dir", str(data)
    )
    assert refused.returncode == 2 and "--passphrase-file" in refused.stderr
    issued = in_process(
        "--passphrase-file",
        str(secret),
        "ca",
        "issue-server",
        "--name",
        "web",
        "--ip",
        "127.0.0.1",
        "--data-dir",
        str(data),
    )
    assert issued.returncode == 0, issued.stderr
    by_env = in_process(
        "ca",
        "issue-client",
        "--operator",
        "ops",
        "--data-dir",
        str(data),
        env={"CERTFLEET_CA_PASSPHRASE_FILE": str(secret)},
    )
    assert by_env.returncode == 0, by_env.stderr


def test_registry_settings_read_the_passphrase_file(tmp_path: Path) -> None:
    settings = RegistrySettings(ca_passphrase_file=secret_file(tmp_path))
    assert settings.ca_passphrase_bytes == PASSPHRASE.encode()


@pytest.mark.parametrize(
    ("text", "mode", "env", "match"),
    [
        (PASSPHRASE, 0o644, {}, "readable by other users"),
        ("\n", 0o600, {}, "is empty"),
        (PASSPHRASE, 0o600, {"CERTFLEET_CA_PASSPHRASE": "x"}, "keep only one"),
    ],
)
def test_a_passphrase_file_that_cannot_be_trusted_is_refused(
    tmp_path: Path, text: str, mode: int, env: dict[str, str], match: str
) -> None:
    data = tmp_path / "data"
    secret = secret_file(tmp_path, text, mode)
    result = in_process(
        "ca", "init", "--data-dir", str(data), "--passphrase-file", str(secret), env=env
    )
    assert result.returncode == 2
    assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not DataLayout(data).root_cert.exists()


# -- log format --------------------------------------------------------------------------------


def test_log_format_json_is_one_object_per_line_with_the_pairs_lifted(tmp_path: Path) -> None:
    result = certfleet(
        "--log-format",
        "json",
        "ca",
        "init",
        "--data-dir",
        str(tmp_path),
        "--trust-domain",
        "json.test",
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines()]
    created = next(e for e in events if e["event"] == "ca created")
    assert created["trust_domain"] == "json.test" and created["level"] == "info"
    assert created["logger"] == "factory.cli" and created["ts"].endswith("Z")


def test_log_format_logfmt_is_the_default_and_a_bad_format_is_refused(tmp_path: Path) -> None:
    result = in_process("ca", "init", "--data-dir", str(tmp_path / "a"))
    line = next(x for x in result.stderr.splitlines() if "ca created" in x)
    assert line.startswith("ts=") and " level=info logger=factory.cli ca created " in line
    bad = in_process("--log-format", "xml", "ca", "init", "--data-dir", str(tmp_path / "b"))
    assert bad.returncode == 2 and "--log-format 'xml' is not one of logfmt, json" in bad.stderr
