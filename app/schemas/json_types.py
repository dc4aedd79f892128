"""Field types for request bodies validated strictly (a value of another JSON type is refused, not coerced)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator


def _integral_float_to_int(value: Any) -> Any:
    # JSON Schema counts 3.0 as an integer, and clients that serialise numbers as floats send it so; strict
    # validation would refuse it. Strings ("3") and fractions (3.5) still are.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Integers as JSON Schema means them: 3 or 3.0, never "3". Constraints of an optional field go inside the
# Annotated, before INTEGRAL (`Annotated[int, Field(ge=0), INTEGRAL] | None`): placed after a function
# validator they are still enforced but published as non-standard "ge"/"le" keywords in the OpenAPI schema.
INTEGRAL = BeforeValidator(_integral_float_to_int)
JsonInt = Annotated[int, INTEGRAL]
