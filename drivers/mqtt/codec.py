"""MQTT device payloads, pure: bytes in, values out (JSON paths), and command templates to bytes.

Rules: nothing here does I/O or keeps state. A JSON path is dotted (`display.screen`,
`disks.0.free_mb`: a number picks an array item); the empty path is the whole payload, read as
JSON when it parses and as plain text otherwise. A template is any JSON value whose strings may
hold `{name}` placeholders: a string that is exactly one placeholder becomes the value itself
(a number stays a number), other strings get the value as text; the result is written by
`json.dumps`, so text is always escaped and a value is never scanned for placeholders again.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z0-9_]+)\}")
_NAME = re.compile(r"^[a-z0-9_]+$")


class PayloadError(ValueError):
    """A payload that cannot be read at all (not UTF-8, not JSON where JSON is needed)."""


class MissingField(LookupError):
    """A JSON path that leads nowhere in a payload."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"no field {self.path!r}"


def split_path(path: str) -> tuple[str, ...]:
    """`a.b.0` → ('a', 'b', '0'); '' → (). ValueError for an empty segment ('a..b')."""
    if path == "":
        return ()
    parts = tuple(path.split("."))
    if any(part == "" for part in parts):
        raise ValueError(f"JSON path {path!r} has an empty segment")
    return parts


def extract(document: Any, parts: tuple[str, ...]) -> Any:
    """The value at `parts` in a decoded JSON document; MissingField when it is not there."""
    current = document
    for depth, part in enumerate(parts):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise MissingField(".".join(parts[: depth + 1]))
    return current


def text_of(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"not UTF-8 text (byte {exc.start})") from None


def parse_json(payload: bytes) -> Any:
    """The decoded JSON document; PayloadError naming where the text goes wrong."""
    text = text_of(payload)
    try:
        return _loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadError(
            f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError as exc:
        raise PayloadError(f"invalid JSON ({exc})") from None
    except RecursionError:
        raise PayloadError("invalid JSON (nested too deeply)") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def plain_value(payload: bytes) -> Any:
    """A whole payload as a value: JSON when it parses (`21.5`, `true`, `"on"`), else its text."""
    text = text_of(payload).strip()
    try:
        return _loads(text)
    except (ValueError, RecursionError):
        return text


def value_at(payload: bytes, parts: tuple[str, ...]) -> Any:
    """The value a point reads from one payload (the whole payload for the empty path)."""
    if not parts:
        return plain_value(payload)
    return extract(parse_json(payload), parts)


# -- command templates ---------------------------------------------------------------------------


def placeholders(template: Any) -> set[str]:
    """Every placeholder name used in a template (in its strings; keys are taken literally)."""
    found: set[str] = set()
    if isinstance(template, str):
        found.update(m.group(1) for m in PLACEHOLDER.finditer(template) if m.group(1))
    elif isinstance(template, Mapping):
        for item in template.values():
            found |= placeholders(item)
    elif isinstance(template, list):
        for item in template:
            found |= placeholders(item)
    return found


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fill(template: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole is not None and whole.group(1):
            return values[whole.group(1)]

        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return match.group(0)[0]  # '{{' → '{', '}}' → '}'
            return _as_text(values[name])

        return PLACEHOLDER.sub(one, template)
    if isinstance(template, Mapping):
        return {key: _fill(item, values) for key, item in template.items()}
    if isinstance(template, list):
        return [_fill(item, values) for item in template]
    return template


def render(template: Any, values: Mapping[str, Any]) -> bytes:
    """The payload of a command: a mapping or list template is sent as compact JSON, a plain
    string template as its text. KeyError for a placeholder without a value; ValueError for a
    value JSON cannot carry (NaN, infinity)."""
    missing = placeholders(template) - set(values)
    if missing:
        raise KeyError(f"no value for {', '.join(sorted(missing))}")
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: {value} cannot be sent (not a finite number)")
    filled = _fill(template, values)
    if isinstance(template, str):
        return _as_text(filled).encode("utf-8")
    return json.dumps(filled, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def template_problems(template: Any, known: set[str]) -> list[str]:
    """What is wrong with a template given the placeholder names it may use."""
    problems = [
        f"unknown placeholder {{{name}}} (known: {', '.join(sorted(known))})"
        for name in sorted(placeholders(template) - known)
    ]
    problems += [
        f'{{{name}}} is read by YAML as a mapping: quote it, "{{{name}}}"'
        for name in sorted(_unquoted(template))
    ]
    return problems


def _unquoted(template: Any) -> set[str]:
    """Names written `{name}` without quotes: YAML makes them one-key mappings with no value."""
    found: set[str] = set()
    if isinstance(template, Mapping):
        if len(template) == 1:
            ((key, item),) = template.items()
            if item is None and isinstance(key, str) and _NAME.match(key):
                found.add(key)
        for item in template.values():
            found |= _unquoted(item)
    elif isinstance(template, list):
        for item in template:
            found |= _unquoted(item)
    return found
