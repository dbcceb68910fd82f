"""``OptionalSecret``: a secret Block field that may be left empty, shown as a password input in Prefect's UI.

Pydantic describes ``SecretStr | None`` as ``anyOf: [{format: password}, {type: null}]``; Prefect 3.8's
Block form renders such a union as a "password / null" switch over a plain text box, so a typed password
shows in clear text. This field is described as one ``{type: string, format: password, writeOnly}`` input
(masked in the create and the edit form); left empty, it is None.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, SecretStr, WithJsonSchema


def _empty_is_none(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, SecretStr) and value.get_secret_value() == "":
        return None
    return value


OptionalSecret = Annotated[
    SecretStr | None,
    BeforeValidator(_empty_is_none),
    WithJsonSchema({"type": "string", "format": "password", "writeOnly": True}),
]
