"""Loads YAML documents (configs, profiles, scenarios) into pydantic models.

Errors name the file, the YAML line and the dotted field, so a person can fix them without reading
a traceback. Documents are read with PyYAML's safe loader only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from wire.errors import DocumentError, Problem

M = TypeVar("M", bound=BaseModel)


def line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the deepest YAML node that `loc` reaches."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            continue  # discriminator tags and similar parts that are not in the document
        node = child
    return line


def parse_yaml(text: str, path: str) -> tuple[Any, yaml.Node | None]:
    try:
        loader = yaml.SafeLoader(text)  # one parse gives both the nodes and the data
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise DocumentError(path, [Problem("", f"not valid YAML: {reason}", line)]) from None
    return data, root


def validate_document(model: type[M], data: Any, path: str, root: yaml.Node | None = None) -> M:
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            Problem(
                ".".join(str(part) for part in err["loc"]),
                err["msg"],
                line_of(root, tuple(err["loc"])),
            )
            for err in exc.errors()
        ]
        raise DocumentError(path, problems) from None


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """The parsed document and its node tree (for `line_of`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DocumentError(str(path), [Problem("", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise DocumentError(str(path), [Problem("", "not UTF-8 text")]) from None
    return parse_yaml(text, str(path))


def load_document(model: type[M], path: Path) -> M:
    data, root = read_yaml(path)
    return validate_document(model, data, str(path), root)
