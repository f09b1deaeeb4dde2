"""``mpo recipe --help-keys``: every recipe key with its type, default and help, read from the schema.

The help text is the dataclass field metadata of :mod:`mpo.schema` (``opt(default, help)``), so the
list cannot drift from what the loader accepts: a key without help is a schema bug, and
:func:`recipe_keys` names it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, get_type_hints

from mpo.schema import CHOICES, HELP, Recipe


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the recipe."""

    key: str  # dotted, e.g. train.beta
    type: str  # e.g. "float", "str | null", "list[str]"
    default: Any  # "???" for a required key
    help: str
    choices: tuple[str, ...] | None = None
    section: str = ""  # the docstring of the section the key sits in


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"list[{_type_name(item)}]"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def recipe_keys(cls: type = Recipe, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema in declaration order, with its documentation."""
    docs: list[KeyDoc] = []
    hints = get_type_hints(cls)
    section = (cls.__doc__ or "").strip() if prefix else ""
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            docs += recipe_keys(hints[f.name], key + ".")
            continue
        text = f.metadata.get(HELP, "")
        if not text:
            raise TypeError(f"mpo.schema: {key} has no help text (declare it with opt(default, help))")
        docs.append(
            KeyDoc(key, _type_name(hints[f.name]), _default(f), text, f.metadata.get(CHOICES), section)
        )
    return docs


def _shown(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, list | bool) else str(value)


def format_keys(docs: list[KeyDoc]) -> str:
    """A plain-text table grouped by section, one key per line: key, type, default, help."""
    width = max(len(d.key) for d in docs)
    type_width = max(len(d.type) for d in docs)
    lines: list[str] = []
    current = None
    for d in docs:
        group = d.key.rpartition(".")[0]
        if group != current:
            current = group
            title = group or "(top level)"
            lines += ["", f"{title}: {d.section}" if d.section else title]
        text = d.help + (f" (one of {', '.join(d.choices)})" if d.choices else "")
        lines.append(f"  {d.key:<{width}}  {d.type:<{type_width}}  default {_shown(d.default)}  {text}")
    return "\n".join(lines).lstrip("\n") + "\n"


def keys_as_json(docs: list[KeyDoc]) -> str:
    """The same as JSON (``--schema``), for editors and tools."""
    rows = [
        {"key": d.key, "type": d.type, "default": d.default, "help": d.help, "choices": d.choices}
        for d in docs
    ]
    return json.dumps(rows, indent=2) + "\n"
