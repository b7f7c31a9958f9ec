"""The catalog reference, read from the catalog's schema: every field, its type, default and description.

:func:`catalog_fields` walks :class:`pipelines.catalog.Catalog` and every settings model it holds;
:func:`catalog_reference` writes them as the Markdown page of the documentation, so that the page
and the schema cannot drift apart.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from pipelines.catalog import Catalog


@dataclass(frozen=True)
class Field:
    """One catalog field: its dotted YAML path (``train.split.seed``), the section it belongs to, its type as a
    reader would write it, its default (``None``: required) and its description."""

    path: str
    section: str
    type: str
    default: str | None
    description: str


def _models(annotation) -> list[type[BaseModel]]:
    """The settings models inside an annotation (``X | None``, ``list[X]``, ``dict[str, X]``, unions)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models(argument)]


def _type_name(annotation) -> str:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(arguments[0])
    if origin is typing.Literal:
        return " | ".join(repr(value) for value in arguments)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if argument is type(None) else _type_name(argument) for argument in arguments)
    if origin in (list, tuple):
        inner = [argument for argument in arguments if argument is not Ellipsis]
        return f"list of {_type_name(inner[0])}" if inner else "list"
    if origin is dict:
        return f"mapping of {_type_name(arguments[0])} to {_type_name(arguments[1])}"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"section ({annotation.__name__})"
    return {str: "text", int: "integer", float: "number", bool: "true | false", Path: "path"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field) -> str | None:
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, BaseModel):
        return "its own defaults" if value.model_dump(exclude_defaults=True) == {} else repr(value)
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else repr(value) if not isinstance(value, str) else f"'{value}'"


def _first_paragraph(text: str | None) -> str:
    return " ".join((inspect.cleandoc(text or "").split("\n\n") or [""])[0].split())


def _markdown(text: str) -> str:
    """Docstring markup as Markdown: ``code`` → `code`, :class:`~a.b.C` → `C`."""
    text = re.sub(r":\w+:`~?([\w.]+)`", lambda match: f"`{match.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`")


def _child_path(path: str, annotation) -> str:
    """Where the fields of a nested settings model sit: ``modalities.<name>`` in a mapping, ``associate[]`` in a
    list, ``train.split`` otherwise."""
    for argument in (annotation, *typing.get_args(annotation)):
        origin = typing.get_origin(argument)
        if origin is dict:
            return f"{path}.<name>"
        if origin in (list, tuple) and _models(argument):
            return f"{path}[]"
    return path


def catalog_fields(model: type[BaseModel] = Catalog, prefix: str = "", section: str = "") -> list[Field]:
    """Every field of ``model`` and of the settings models it holds, depth first, in the schema's order."""
    fields = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        path = f"{prefix}{key}"
        nested = _models(field.annotation)
        description = field.description or (_first_paragraph(nested[0].__doc__) if len(nested) == 1 else "")
        fields.append(Field(path, section, _type_name(field.annotation), _default(field), _markdown(description)))
        child = _child_path(path, field.annotation)
        for inner in nested:
            variant = inner.model_fields.get("profile")
            label = f"{child} (profile: {variant.default})" if len(nested) > 1 and variant is not None else child
            fields += catalog_fields(inner, f"{child}.", label)
    return fields


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def catalog_reference() -> str:
    """The catalog reference page: one table per section, each field with its type, default and description."""
    fields = catalog_fields()
    lines = ["# Catalog reference", "",
             "Every field a catalog may hold, generated from the catalog's schema (`pipelines.catalog.Catalog` "
             "and the engine's settings models it is made of). Paths are relative to the catalog file's folder. "
             "`relcohort validate CATALOG` checks a catalog against this schema and names every field that is "
             "wrong.", ""]
    for section in dict.fromkeys(field.section for field in fields):
        rows = [field for field in fields if field.section == section]
        lines += [f"## `{section}`" if section else "## Top level", ""]
        if section:
            parent = next((field for field in fields
                           if field.path == section.split(" (")[0].removesuffix("[]").removesuffix(".<name>")), None)
            if parent is not None and parent.description:
                lines += [_cell(parent.description), ""]
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for field in rows:
            name = field.path.rsplit(".", 1)[-1] if section else field.path
            default = "required" if field.default is None else f"`{_cell(field.default)}`"
            lines.append(f"| `{name}` | {_cell(field.type)} | {default} | {_cell(field.description)} |")
        lines.append("")
    return "\n".join(lines)
