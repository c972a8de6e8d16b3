"""docs/asyncapi.yaml states the same bounds the decoders enforce (gc_core/protocol.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gc_core import protocol

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


def _contract() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(CONTRACT.read_text())
    return document


def test_the_contract_defines_ids_names_and_labels_as_the_decoders_check_them() -> None:
    schemas = _contract()["components"]["schemas"]
    assert schemas["Id"]["pattern"] == protocol._ID_PATTERN
    assert f"{{1,{protocol.MAX_ID_LENGTH}}}" in schemas["Id"]["pattern"]
    assert (schemas["Name"]["pattern"], schemas["Name"]["maxLength"]) == (
        protocol._PRINTABLE_PATTERN, protocol.MAX_NAME_LENGTH)
    assert (schemas["Label"]["pattern"], schemas["Label"]["maxLength"]) == (
        protocol._PRINTABLE_PATTERN, protocol.MAX_LABEL_LENGTH)
    error = schemas["ErrorInfo"]["properties"]
    assert error["message"]["maxLength"] == protocol.MAX_ERROR_MESSAGE
    assert error["traceback"]["maxLength"] == protocol.MAX_ERROR_TRACEBACK
    assert schemas["GroupManifest"]["properties"]["task_ids"]["maxItems"] == protocol.MAX_MANIFEST_TASKS


def test_the_contract_bounds_json_headers_and_output_as_the_decoders_do() -> None:
    contract = _contract()
    task_headers = contract["components"]["messages"]["TaskMessage"]["headers"]["properties"]
    for name in ("gc-resource-spec", "gc-user-endpoint-config"):
        assert task_headers[name]["maxLength"] == protocol.MAX_JSON_HEADER
    description = contract["info"]["description"]
    assert f"at most {protocol.MAX_JSON_HEADER} characters, nested at most {protocol.MAX_JSON_DEPTH} levels" in description
    assert f"at most {protocol.MAX_OUTPUT_HEADER} UTF-8 bytes" in description
    assert f"at most {protocol.MAX_EVENT_BYTES // 2**20} MiB of JSON" in description
    assert f"(a heartbeat: {protocol.MAX_HEARTBEAT_BYTES // 2**10} KiB)" in description
