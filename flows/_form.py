"""What a runbook's run form shows for each parameter: a label and an explanation.

Prefect 3.8.8 builds each parameter's schema with a ``Field`` of its own (the Python name as title, the
docstring's text or nothing as description) that overrides an ``Annotated`` ``Field``'s title and
description, but it merges ``json_schema_extra``: the title and description set there reach the form.
Each description says what the parameter does, its default and what the default leads to. A parameter
that can destroy data or skip a safeguard starts its title with ``DANGER:``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

DANGER = "DANGER: "


def param(title: str, description: str, **constraints: Any) -> Any:
    """A ``Field`` for ``Annotated[type, param(...)]``: the form's label, its explanation, and constraints."""
    return Field(description=description, json_schema_extra={"title": title, "description": description},
                 **constraints)
