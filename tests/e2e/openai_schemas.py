"""Validate bodies against OpenAI's published JSON schemas.

tests/data/openai-api-schemas.json is an extract of the public openai/openai-openapi `openapi.json`
(chat and text completion requests and responses, stream chunks, model list, error body, and what
they reference), with OpenAPI's `nullable: true` rewritten as `anyOf [..., {"type": "null"}]` so a
plain JSON Schema 2020-12 validator accepts the nulls the real API sends."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "openai-api-schemas.json"


@cache
def _document() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    document = _document()
    assert name in document["components"]["schemas"], name
    return jsonschema.Draft202012Validator({**document, "$ref": f"#/components/schemas/{name}"})


def validate(instance: Any, name: str) -> None:
    """Raise jsonschema.ValidationError if `instance` is not a valid `name`."""
    _validator(name).validate(instance)
