"""The configuration reference (``docs/configuration.md``), generated from the schema.

Every key's type, default and description comes from the pydantic models of
:mod:`policies.schema` (``Field(description=...)``), so the schema stays the one source of
what a key means. Regenerate the page after changing the schema::

    python -m policies.reference > docs/configuration.md

``tests/policies/test_reference.py`` fails when the page is out of date or a field has no
description (:func:`undocumented`).
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from policies.schema import Settings

__all__ = ["main", "render", "undocumented"]

_HEADER = """\
# Configuration reference

<!-- Generated from the schema (policies/schema/) by
     `python -m policies.reference > docs/configuration.md`: edit the models, not this page. -->

sparsity-router reads one YAML file (`sparsity-router serve --config FILE`; without one, the
embedded `config/default.yaml`). Check a file with `sparsity-router check FILE`: every problem
is reported with its line and YAML path.
"""


@dataclass(frozen=True, slots=True)
class _Section:
    """One model documented at one place of the file (``path`` as the user writes it)."""

    path: str
    model: type[BaseModel]
    variant: str = ""  # "type: openai" for one member of a tagged union

    @property
    def title(self) -> str:
        return f"{self.path} ({self.variant})" if self.variant else self.path

    @property
    def anchor(self) -> str:
        return "cfg-" + _slug(self.title)


def render() -> str:
    """The whole reference page, as Markdown."""
    sections = _layout()
    anchors = {s.model: s.anchor for s in sections}
    out = [_HEADER, "## Top level", "", _doc(Settings), "", *_table(Settings, anchors)]
    for name, field in Settings.model_fields.items():
        inside = [
            s for s in sections if s.path == name or s.path.startswith((f"{name}.", f"{name}["))
        ]
        out += ["", f'<a id="cfg-{_slug(name)}"></a>', "", f"## `{name}`", ""]
        if inside[0].path != name:  # no model of its own: a mapping or list of them
            out += [_text(field.description or ""), ""]
        for section in inside:
            if section.path != name:
                variant = f" ({section.variant})" if section.variant else ""
                out += [f'<a id="{section.anchor}"></a>', "", f"### `{section.path}`{variant}", ""]
            out += [_doc(section.model), "", *_table(section.model, anchors), ""]
        while out[-1] == "":
            out.pop()
    return "\n".join(out) + "\n"


def undocumented() -> list[str]:
    """``path.key`` of every field reachable from :class:`Settings` without a description."""
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    for section in _layout():
        for name, field in section.model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{section.title}.{name}")
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference page (``python -m policies.reference > docs/configuration.md``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args:
        print("usage: python -m policies.reference > docs/configuration.md", file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0


# -- layout -----------------------------------------------------------------------------------


def _layout() -> list[_Section]:
    """Each model reachable from the root, once, at the first place it appears (depth first)."""
    sections: list[_Section] = []
    seen: set[type[BaseModel]] = set()

    def visit(model: type[BaseModel], path: str, variant: str) -> None:
        if model in seen:
            return
        seen.add(model)
        sections.append(_Section(path, model, variant))
        for name, field in model.model_fields.items():
            for sub, sub_path, sub_variant in _models_in(field.annotation, f"{path}.{name}"):
                visit(sub, sub_path, sub_variant)

    for name, field in Settings.model_fields.items():
        for model, path, variant in _models_in(field.annotation, name):
            visit(model, path, variant)
    return sections


def _models_in(annotation: Any, path: str) -> Iterator[tuple[type[BaseModel], str, str]]:
    """The models an annotation holds: each with the path where it sits and, for a member of a
    tagged union, which member it is."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, path, ""
        return
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        yield from _models_in(args[0], path)
    elif origin is dict:
        yield from _models_in(args[1], f"{path}.<name>")
    elif origin in (tuple, list):
        yield from _models_in(args[0], f"{path}[]")
    elif _is_union(annotation):
        options = [a for a in args if a is not type(None)]
        tagged = len(options) > 1
        for option in options:
            for model, sub_path, variant in _models_in(option, path):
                if tagged and sub_path == path:
                    variant = f"type: {_tag(model)}"
                yield model, sub_path, variant


def _tag(model: type[BaseModel]) -> str:
    field = model.model_fields.get("type")
    values = get_args(field.annotation) if field is not None else ()
    return str(values[0]) if values else model.__name__


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _slug(text: str) -> str:
    """``policies.<name>.rules[]`` -> ``policies-name-rules-item`` (an HTML id)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("[]", "-item")).strip("-")


# -- rendering --------------------------------------------------------------------------------


def _table(model: type[BaseModel], anchors: dict[type[BaseModel], str]) -> list[str]:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        cells = (
            f"`{name}`",
            _type(field.annotation, anchors) + _constraints(field),
            _default(field),
            _text(field.description or ""),
        )
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def _type(annotation: Any, anchors: dict[type[BaseModel], str]) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[mapping](#{anchors[annotation]})"
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation in simple:
        return simple[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type(args[0], anchors)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin is dict:
        return f"mapping of {_type(args[0], anchors)} to {_type(args[1], anchors)}"
    if origin in (tuple, list):
        return f"list of {_type(args[0], anchors)}"
    if _is_union(annotation):
        options = [a for a in args if a is not type(None)]
        if all(isinstance(o, type) and issubclass(o, BaseModel) for o in options):
            shown = " or ".join(f"[{_tag(o)}](#{anchors[o]})" for o in options)
            text = f"mapping ({shown})" if len(options) > 1 else _type(options[0], anchors)
        else:
            text = " or ".join(_type(o, anchors) for o in options)
        return text + (" or null" if len(options) < len(args) else "")
    raise TypeError(f"no rendering for the annotation {annotation!r}")  # pragma: no cover


#: The bounds pydantic keeps in ``FieldInfo.metadata`` (annotated-types objects), by attribute.
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _constraints(field: FieldInfo) -> str:
    parts: list[str] = []
    for item in field.metadata:
        for attr, symbol in _BOUNDS:
            bound = getattr(item, attr, None)
            if bound is not None:
                parts.append(f"{symbol} {_value(bound)}")
        min_length = getattr(item, "min_length", None)
        if min_length is not None:
            parts.append("non-empty" if min_length == 1 else f"length ≥ {min_length}")
        max_length = getattr(item, "max_length", None)
        if max_length is not None:
            parts.append(f"length ≤ {max_length}")
    return f" ({', '.join(parts)})" if parts else ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel) and value == type(value)():
        return "its defaults"
    return f"`{_value(value)}`"


def _value(value: Any) -> str:
    """A value as it would be written in the YAML file (flow style)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def _doc(model: type[BaseModel]) -> str:
    """A model's docstring as Markdown (reST roles and literals become code spans)."""
    text = inspect.cleandoc(model.__doc__ or "")
    text = _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    return _text(text.replace("``", "`"))


def _text(text: str) -> str:
    """Escape ``<`` outside code spans (Markdown would read ``<name>`` as HTML)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
