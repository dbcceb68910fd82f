"""What a runbook's run form shows for each parameter: a label and an explanation.

Prefect labels every parameter with its Python name and reads only the description from ``Field``; the
title set here (through ``json_schema_extra``, which Prefect merges into the parameter's schema) replaces
the snake_case name in the form. Each description says what the parameter does, its default and what the
default leads to. A parameter that can destroy data or skip a safeguard starts its title with ``DANGER:``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

DANGER = "DANGER: "


def param(title: str, description: str, **constraints: Any) -> Any:
    """A ``Field`` for ``Annotated[type, param(...)]``: the form's label, its explanation, and constraints."""
    return Field(description=description, json_schema_extra={"title": title}, **constraints)
