"""Block schemas that a saved-Block reference can validate against.

A runbook parameter typed with one of our Blocks takes either the Block's fields or a reference to a saved
Block, ``{"$ref": {"block_document_id": ...}}`` (what Prefect's block picker sends) or
``{"$ref": {"block_document_slug": ...}}`` (what prefect.yaml holds). Prefect 3.8's parameter check (the
run form's "Validate parameters" box, ``enforce_parameter_schema``) accepts a reference through a
``oneOf`` of the Block's schema and a reference schema; every field of our Blocks has a default, so a
reference also matched the Block's schema and the ``oneOf`` failed. ``propertyNames: {not: {const: "$ref"}}``
keeps a reference out of the Block's own schema, so exactly one branch matches. (Not ``not: {required:
[...]}``: the server drops every ``required`` keyword when it checks a deployment's defaults.)

Prefect checks the defaults of a NEW deployment with an older validator that knows no references; a
deployment with Block defaults is therefore created with enforcement off and switched on after
(deployments/serve.py).
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block, schema_extra
from pydantic import ConfigDict


def referenceable_schema(schema: dict[str, Any], model: type[Block]) -> None:
    """Prefect's Block schema, plus: an object with a ``$ref`` key is a reference, not the Block's fields."""
    schema_extra(schema, model)
    schema["propertyNames"] = {"not": {"const": "$ref"}}


REFERENCEABLE = ConfigDict(json_schema_extra=referenceable_schema)  # type: ignore[typeddict-item]
