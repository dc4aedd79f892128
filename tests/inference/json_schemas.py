"""JSON schemas that structured outputs must honour, one per feature users reach for: nested objects, arrays,
enums, required and optional fields, string formats and patterns, anyOf, $ref, nullable fields and numeric ranges.

Strings, arrays and numbers are bounded so that even a model with random weights finishes its answer within the
tests' token budget: a constraint decides which tokens may follow, not when a random model closes a string.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 12}


def strict(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """An object as OpenAI's strict mode writes it: no other properties, every listed one required unless optional."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "person": strict({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}}),
    "label_enum": strict({"label": {"enum": ["positive", "negative", "neutral"]}}),
    "nested_address": strict(
        {
            "name": NAME,
            "address": strict({"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": r"^\d{5}$"}}),
        }
    ),
    "string_array": strict({"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 4}}),
    "object_array": strict(
        {
            "items": {
                "type": "array",
                "items": strict({"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}),
                "maxItems": 3,
            }
        }
    ),
    "any_of_scalar": strict({"value": {"anyOf": [{"type": "integer", "minimum": -50, "maximum": 50}, NAME]}}),
    "number_range": strict({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    "booleans": strict({"spam": {"type": "boolean"}, "urgent": {"type": "boolean"}}),
    "date_format": strict({"day": {"type": "string", "format": "date"}}),
    "email_format": strict({"email": {"type": "string", "format": "email", "maxLength": 24}}),
    "uuid_format": strict({"id": {"type": "string", "format": "uuid"}}),
    "pattern": strict({"code": {"type": "string", "pattern": r"^[A-Z]{3}-\d{3}$"}}),
    "nullable": strict(
        {"note": {"type": ["string", "null"], "maxLength": 8}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}
    ),
    "const": strict({"version": {"const": "v1"}, "ok": {"type": "boolean"}}),
    "refs": {
        "$defs": {
            "point": strict(
                {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                }
            )
        },
        **strict({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "deep_nesting": strict({"a": strict({"b": strict({"c": strict({"d": {"enum": [1, 2, 3]}})})})}),
    "optional_fields": strict(
        {"title": NAME, "subtitle": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        optional=("subtitle", "year"),
    ),
    "integer_enum": strict({"stars": {"enum": [1, 2, 3, 4, 5]}}),
    "tagged_union": strict(
        {
            "shape": {
                "anyOf": [
                    strict({"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1, "maximum": 9}}),
                    strict({"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 9}}),
                ]
            }
        }
    ),
    "tuple": strict(
        {
            "pair": {
                "type": "array",
                "prefixItems": [NAME, {"type": "integer", "minimum": 0, "maximum": 9}],
                "items": False,
                "minItems": 2,
            }
        }
    ),
    "top_level_array": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 5},
    "string_lengths": strict({"short": {"type": "string", "minLength": 2, "maxLength": 3}}),
}
