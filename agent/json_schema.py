"""JSON Schema (2020-12, as OpenAPI 3.1 takes it) generated from the schema's records.

The collector's OpenAPI document (collector/web/openapi.py) describes its request bodies
with these, so what it publishes cannot drift from what agent/decoding.py enforces: the
same dataclasses, the same bounds (the field's own, else its unit's physical limit), the
same text formats, required fields and no unknown properties.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin

from agent.decoding import field_types
from agent.schema import (
    INSTRUCTION_VERSION_RE,
    LABEL_MAX_CHARS,
    PROBE_ID_RE,
    REASON_CODE_RE,
    physical_bounds,
)


def json_schema(cls: type, defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON Schema (2020-12 / OpenAPI 3.1) of dataclass ``cls``; nested dataclasses go to
    ``defs`` and are referenced as ``#/components/schemas/Name``. Mirrors decoding.decode:
    required fields, bounds, enums, nullability, no unknown properties."""
    defs = {} if defs is None else defs
    hints = field_types(cls)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        properties[f.name] = _schema_of(hints[f.name], physical_bounds(f.name, dict(f.metadata)),
                                        defs)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    schema = {"type": "object", "properties": properties, "required": required,
              "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = " ".join(cls.__doc__.split())
    defs[cls.__name__] = schema
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def _schema_of(tp: Any, meta: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        inner = _schema_of(options[0], meta, defs)
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema_of(args[0], {}, defs)}
        return {"type": "array", "prefixItems": [_schema_of(a, {}, defs) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return json_schema(tp, defs)
    out: dict[str, Any] = {bool: {"type": "boolean"}, int: {"type": "integer"},
                           float: {"type": "number"}, str: {"type": "string"}}[tp].copy()
    for key, name in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum")):
        if meta.get(key) is not None:
            out[name] = meta[key]
    fmt = meta.get("format")
    if fmt == "label":
        out["maxLength"] = LABEL_MAX_CHARS
    elif fmt == "utc":
        out["format"] = "date-time"
    elif fmt == "uuid":
        out["format"] = "uuid"
    elif fmt == "probe_id":
        out["pattern"] = PROBE_ID_RE.pattern
    elif fmt == "reason_code":
        out["pattern"] = REASON_CODE_RE.pattern
    elif fmt == "instruction_version":
        out["pattern"] = INSTRUCTION_VERSION_RE.pattern
    return out
