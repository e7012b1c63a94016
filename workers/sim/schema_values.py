"""Deterministic JSON values from a JSON schema, for the provider simulator.

The simulator answers as a model that obeys the request: a tool call's arguments follow
the tool's `parameters` schema and a `json_schema` response format gets a value valid
against its schema. `value_for(schema)` builds that value: the same schema always gives
the same value, and property names show up in the strings ("sim city"), so a test reading
an answer can tell where each value came from.

Covered: `type` (one or a list), `const`, `enum`, `properties` (every property, required
or not, until the nesting gets deep), `required`, `items`, `prefixItems`, `minItems` /
`maxItems` / `uniqueItems`, `minLength` / `maxLength`, string `format`s (date, date-time,
time, email, uri, uuid, ipv4, ipv6, hostname), numeric bounds (inclusive, exclusive in both
the draft-4 and the later form) and `multipleOf`, `anyOf` / `oneOf` (the first branch),
`allOf` (merged), and local `$ref`s (`#/$defs/...`, `#/definitions/...`, `#`). A `pattern`
is met on a best-effort basis: the first of a few candidate strings that matches it.

Any JSON is accepted as a schema and never makes it raise: nonsense keywords are ignored,
recursion and sizes are bounded (GIVE_UP, NODES, MAX_ITEMS, MAX_LENGTH), so a request
carrying a strange schema still gets an answer.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from typing import Any

DEEP = 6  # below this nesting, objects keep only their required properties
GIVE_UP = 40  # nesting at which a (recursive) schema gets null rather than looping
NODES = 10_000  # values one schema may cost; past it, null (a schema that would explode)
MAX_ITEMS = 100  # arrays and strings stay small whatever minItems / minLength ask
MAX_LENGTH = 10_000

_FORMATS = {
    "date": "2026-01-01",
    "date-time": "2026-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "sim@example.com",
    "idn-email": "sim@example.com",
    "uri": "https://example.com/sim",
    "url": "https://example.com/sim",
    "iri": "https://example.com/sim",
    "uri-reference": "https://example.com/sim",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "duration": "P1D",
}
_PATTERN_TRIES = ("sim", "a", "A", "0", "1", "a1", "AB", "abc", "sim-1", "x_1", "2026-01-01")


def value_for(schema: Any, name: str = "value") -> Any:
    """A JSON value valid against `schema` (a JSON schema dict, or True/False/None).

    `name` is the property the value is for; strings carry it ("sim <name>")."""
    return _Generator(schema if isinstance(schema, dict) else {}).value(schema, name, 0, 0)


def arguments_for(parameters: Any) -> str:
    """A tool call's `arguments`: the JSON text of an object valid against `parameters`
    (a tool without parameters gets `{}`)."""
    if not isinstance(parameters, dict) or not parameters:
        return "{}"
    value = value_for(parameters, "arguments")
    return json.dumps(value if isinstance(value, dict) else {})


class _Generator:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.left = NODES

    def resolve(self, ref: str) -> Any:
        """The schema a local `$ref` (a JSON pointer into the root schema) points at."""
        if not ref.startswith("#"):
            return {}  # a remote reference: nothing to follow, anything goes
        node: Any = self.root
        for token in ref[1:].split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return {}
        return node

    def flatten(self, schema: dict[str, Any], depth: int = 0) -> dict[str, Any]:
        """`schema` with its `$ref` followed and its `allOf` merged in (properties and
        required united, the other keywords of later parts added)."""
        if depth > GIVE_UP:
            return {}
        if "$ref" in schema:
            target = self.resolve(str(schema["$ref"]))
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**(target if isinstance(target, dict) else {}), **rest}
        parts = schema.get("allOf")
        if not isinstance(parts, list):
            return schema
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in parts:
            if not isinstance(part, dict):
                continue
            part = self.flatten(part, depth + 1)
            for key, value in part.items():
                had = merged.get(key)
                if key == "properties" and isinstance(value, dict) and isinstance(had, dict):
                    merged["properties"] = {**had, **value}
                elif key == "required" and isinstance(value, list) and isinstance(had, list):
                    merged["required"] = [*had, *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def value(self, schema: Any, name: str, depth: int, salt: int) -> Any:
        """The value for `schema`; `salt` varies it among the items of one array."""
        if schema is True or schema is None or not isinstance(schema, dict):
            return f"sim {name}" if salt == 0 else f"sim {name} {salt}"
        self.left -= 1
        if depth > GIVE_UP or self.left < 0:
            return None
        schema = self.flatten(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            enum = schema["enum"]
            return enum[salt % len(enum)]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                first = branches[0] if isinstance(branches[0], dict) else {}
                return self.value({**rest, **first}, name, depth + 1, salt)
        return self.typed(schema, name, depth, salt)

    def typed(self, schema: dict[str, Any], name: str, depth: int, salt: int) -> Any:
        """The value for a schema without const, enum or alternatives: by its type."""
        kind = _type_of(schema)
        if kind == "object":
            return self.object(schema, depth, salt)
        if kind == "array":
            return self.array(schema, name, depth, salt)
        if kind in ("integer", "number"):
            try:
                return _integer(schema, salt) if kind == "integer" else _number(schema, salt)
            except (OverflowError, ValueError, ZeroDivisionError):
                return 0  # bounds too extreme for float arithmetic
        if kind == "boolean":
            return salt % 2 == 0
        if kind == "null":
            return None
        return _string(schema, name, salt)

    def object(self, schema: dict[str, Any], depth: int, salt: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        required = [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
        names = [*properties, *(r for r in required if r not in properties)]
        if depth >= DEEP:
            names = [n for n in names if n in required]
        limit = schema.get("maxProperties")
        if isinstance(limit, int) and len(names) > limit:
            names = [n for n in names if n in required] + [n for n in names if n not in required][
                : max(0, limit - len(required))
            ]
        out: dict[str, Any] = {}
        for key in names:
            sub = properties.get(key, schema.get("additionalProperties", True))
            out[key] = self.value(sub, key, depth + 1, salt)
        return out

    def array(self, schema: dict[str, Any], name: str, depth: int, salt: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items", True)
        if isinstance(items, list):  # the draft-4 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        low = schema.get("minItems")
        high = schema.get("maxItems")
        count = max(low if isinstance(low, int) else 0, len(prefix), 1)
        if depth >= DEEP:
            count = max(low if isinstance(low, int) else 0, len(prefix))
        if isinstance(high, int):
            count = min(count, high)
        count = min(count, MAX_ITEMS)
        if items is False:
            count = min(count, len(prefix))
        out = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            out.append(self.value(sub, name, depth + 1, salt + i))
        return out


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        named = [str(k) for k in kind if k != "null"]
        kind = named[0] if named else ("null" if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema or "minItems" in schema:
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "multipleOf")):
        return "number"
    return "string"


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(low, low is exclusive, high, high is exclusive) of a numeric schema."""
    low, high = _num(schema.get("minimum")), _num(schema.get("maximum"))
    low_x, high_x = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    low_open = low_x is True  # draft 4: a flag on minimum
    high_open = high_x is True
    low_at, high_at = _num(low_x), _num(high_x)  # later drafts: a bound of its own
    if low_at is not None and (low is None or low_at >= low):
        low, low_open = low_at, True
    if high_at is not None and (high is None or high_at <= high):
        high, high_open = high_at, True
    return low, low_open, high, high_open


def _step(schema: dict[str, Any]) -> float | None:
    """The schema's positive `multipleOf`, if any."""
    step = _num(schema.get("multipleOf"))
    return step if step is not None and step > 0 else None


def _num(value: Any) -> float | None:
    """`value` as a float when it is a finite JSON number (not a boolean), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            number = float(value)
            return number if math.isfinite(number) else None
    return None


def _integer(schema: dict[str, Any], salt: int) -> int:
    low, low_open, high, high_open = _bounds(schema)
    given = _step(schema)
    step = int(given) if given is not None and given.is_integer() else 1
    top = None if high is None else math.floor(high) - (1 if high_open and high.is_integer() else 0)
    if low is not None:
        start = math.floor(low) + 1 if low_open else math.ceil(low)
    else:
        start = 1 if top is None else min(1, top)
    value = (-(-start // step) + salt) * step  # a multiple of the step, at or above start
    if top is not None and value > top:
        value = (top // step) * step
    return value


def _number(schema: dict[str, Any], salt: int) -> float | int:
    low, low_open, high, high_open = _bounds(schema)
    step = _step(schema)
    if step is not None:  # a whole multiple (exact for steps like 0.5, 0.25)
        if low is None:
            n = 1 if high is None else min(1, math.floor(high / step))
        else:
            n = math.ceil(low / step)
            n += 1 if low_open and n * step <= low else 0
        n += salt
        if high is not None and (n * step > high or (high_open and n * step >= high)):
            n = math.floor(high / step)
            n -= 1 if high_open and n * step >= high else 0
        value = n * step
        return int(value) if float(value).is_integer() else float(value)

    def inside(v: float) -> bool:
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if inside(1.5 + salt):
        return 1.5 + salt
    if low is not None and high is not None:
        if low == high:
            return low
        return low + (high - low) * (salt + 1) / (salt + 2)  # strictly between the two
    if low is not None:
        return low + 0.5 + salt
    assert high is not None
    return high - 0.5 - salt


def _string(schema: dict[str, Any], name: str, salt: int) -> str:
    shown = re.sub(r"\s+", " ", name).strip() or "value"
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS:
        text = _FORMATS[fmt]
    else:
        text = f"sim {shown}" if salt == 0 else f"sim {shown} {salt}"
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        text = _matching(pattern, text, salt)
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text += "x" * (min(low, MAX_LENGTH) - len(text))
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text


def _matching(pattern: str, text: str, salt: int) -> str:
    """The first candidate matching `pattern`, else `text`. Candidates are short, so even
    a pattern that backtracks badly is tried in little time."""
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return text
    mine = [text] if len(text) <= 24 else []
    for candidate in (*mine, *_PATTERN_TRIES):
        candidate = candidate if salt == 0 or candidate == text else f"{candidate}{salt}"
        if compiled.search(candidate):
            return candidate
    return text
