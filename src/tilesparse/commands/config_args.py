"""Command-line options generated from a config model's fields (:mod:`tilesparse.typed_config`).

Each field becomes ``--field-name`` with the field's description as help; literal types become choices,
booleans flags, ``(start, end)`` pairs ``START,END``. Every option defaults to ``None`` ("not given"), so
that only options given explicitly override the model's defaults or a resumed run's saved values.
A field marked ``json_schema_extra={"cli": False}`` gets no option.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel


def _pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in text.replace("->", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END (e.g. 4,0.05), got {text!r}") from None
    return a, b


def _without_none(tp: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _without_none(args[0])
    if typing.get_origin(tp) is typing.Annotated:
        return _without_none(typing.get_args(tp)[0])
    return tp


def cli_fields(model: type[BaseModel]) -> list[str]:
    """The fields of ``model`` that are command-line options."""
    return [name for name, f in model.model_fields.items()
            if not (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("cli") is False)]


def add_config_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """Add one option per field of ``model`` (except fields marked ``cli: False``). Booleans become flags
    that turn the field on (every boolean field defaults to off)."""
    for name in cli_fields(model):
        info = model.model_fields[name]
        tp = _without_none(info.annotation)
        flag = "--" + name.replace("_", "-")
        help_text = (info.description or "").replace("%", "%%")
        default = info.get_default(call_default_factory=True)
        if tp is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        if default is not None:
            shown = "x".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default {shown})"
        kw: dict[str, Any] = {"default": None, "help": help_text}
        if typing.get_origin(tp) is Literal:
            kw["choices"] = typing.get_args(tp)
        elif tp is int or tp is float:
            kw["type"] = tp
        elif typing.get_origin(tp) is tuple and typing.get_args(tp) == (float, float):
            kw["type"], kw["metavar"] = _pair, "START,END"
        parser.add_argument(flag, **kw)


def config_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The values of ``model``'s options that were given on the command line."""
    return {name: getattr(args, name) for name in cli_fields(model) if getattr(args, name, None) is not None}


__all__ = ["add_config_options", "config_values", "cli_fields"]
