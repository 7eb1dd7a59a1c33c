"""The factory registering a batch with the real registry (end to end over mTLS)."""

from __future__ import annotations

import json

import httpx

from factory.registration import tls_context
from fleetcore.layout import DataLayout
from tests.factory.conftest import run_factory


def test_provisioned_batch_is_registered_and_rerun_is_idempotent(
    layout: DataLayout, registry_url: str
) -> None:
    args = [
        "provision", "--count", "1200", "--registry", registry_url,
        "--data-dir", str(layout.root), "--json",
    ]  # fmt: skip
    first = run_factory(args, env={"CERTFLEET_REGISTRY_TOKEN": ""})
    assert first.exit_code == 0, (first.output, first.exception)
    assert json.loads(first.output)["registry"]["created"] == 1200

    again = run_factory(args, env={"CERTFLEET_REGISTRY_TOKEN": ""})
    assert json.loads(again.output)["registry"]["existing"] == 1200

    context = tls_context(layout.root_cert, (layout.client_cert("ops"), layout.client_key("ops")))
    with httpx.Client(verify=context) as operator:
        device = operator.get(f"{registry_url}/api/v1/devices/dev-000777").json()
    serial = json.loads((layout.device_dir("dev-000777") / "device.json").read_text())["serial"]
    assert device["status"] == "active"
    assert [c["serial"] for c in device["certificates"]] == [serial]
