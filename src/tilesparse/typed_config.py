"""The base of every configuration object (pydantic v2): strict types, unknown keys refused, and
validation errors turned into one-line :class:`~tilesparse.errors.TilesparseError` messages that name the
key path (``methods[2].steps``) and, for a misspelt key, the closest valid one.

:class:`~tilesparse.pruning.PruneConfig`, :class:`~tilesparse.learning.LearnConfig` and the recipe
(:class:`~tilesparse.recipe.Recipe`) are models of this kind; the CLI options of ``prune`` and ``learn``
are generated from their fields (:mod:`tilesparse.commands.config_args`).
"""

from __future__ import annotations

import difflib
import typing
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from .errors import TilesparseError


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ``(start, end)`` of a schedule; YAML and JSON give lists, Python gives tuples.
Pair = Annotated[tuple[float, float], BeforeValidator(_as_tuple)]


class ConfigModel(BaseModel):
    """A configuration object: strict types, no unknown keys; :meth:`parse` raises a one-line
    :class:`TilesparseError`. Models nested in others (the recipe's parts) derive from this one."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)
    _error_prefix: typing.ClassVar[str] = ""

    @classmethod
    def parse(cls, data: Any, prefix: str | None = None):
        """Validate a mapping (parsed YAML / JSON) into this model, raising :class:`TilesparseError`."""
        if not isinstance(data, dict):
            raise TilesparseError(f"{prefix or cls._error_prefix or cls.__name__}: expected a mapping, "
                                  f"got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise config_error(exc, cls, cls._error_prefix if prefix is None else prefix) from None

    def to_dict(self) -> dict:
        """Plain JSON-compatible values (tuples as lists)."""
        return self.model_dump(mode="json")


class UserConfig(ConfigModel):
    """A configuration object users construct directly (``PruneConfig(method="wanda")``): bad values
    raise a one-line :class:`TilesparseError` from the constructor too. Never nested in another model
    (pydantic would call this constructor for the nested part and lose the key path)."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), self._error_prefix) from None


def key_path(loc: tuple) -> str:
    """``('methods', 2, 'steps')`` -> ``methods[2].steps``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the key at the end of ``loc`` (to list its valid keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        current = _inner_model(fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def closest(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for a near miss, else `` (choose from a, b, c)``."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (choose from {', '.join(choices)})"


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a mapping", "list": "a list", "tuple": "a pair of numbers", "model": "a mapping"}


def _message(err: dict, model: type[BaseModel]) -> str:
    loc, kind, ctx = err["loc"], err["type"], err.get("ctx") or {}
    path = key_path(loc)
    got = err.get("input")
    if kind == "extra_forbidden":
        holder = _model_at(model, loc)
        allowed = list(holder.model_fields) if holder is not None else []
        return f"unknown key '{path}'" + (closest(loc[-1], allowed) if allowed else "")
    if kind == "missing":
        return f"'{path}' is required"
    where = f"'{path}' " if path else ""
    if kind == "literal_error":
        expected = [e.strip().strip("'") for e in ctx.get("expected", "").replace(" or ", ", ").split(",")]
        return f"{where}must be one of {', '.join(expected)}, got {got!r}" + (
            closest(got, expected) if isinstance(got, str) and difflib.get_close_matches(got, expected, n=1) else "")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"{where}must be {bounds[kind]} {limit}, got {got!r}"
    for word, text in _KIND_WORDS.items():
        if kind.startswith(word + "_") or kind == f"{word}_type":
            return f"{where}must be {text}, got {got!r}"
    if kind == "model_attributes_type" or kind == "model_type" or kind == "dict_type":
        return f"{where}must be a mapping, got {got!r}"
    msg = str(err.get("msg", ""))
    for lead in ("Value error, ", "Assertion failed, "):
        if msg.startswith(lead):
            msg = msg[len(lead):]
    return f"{where.rstrip()}: {msg}" if where else msg


def config_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> TilesparseError:
    """A one-line :class:`TilesparseError` for the first problem pydantic found."""
    errors = exc.errors(include_url=False)
    # A union tries each member; report the most specific error (the longest key path).
    err = max(errors, key=lambda e: len(e["loc"])) if errors else {"loc": (), "type": "", "msg": str(exc)}
    text = _message(err, model)
    if len(errors) > 1 and err["type"] != "extra_forbidden":
        others = len({key_path(e["loc"]) for e in errors} - {key_path(err["loc"])})
        text += f" (and {others} more)" if others else ""
    return TilesparseError(f"{prefix}: {text}" if prefix else text)


def validator(func):
    """A pydantic field validator from a library function that raises :class:`TilesparseError`: its message
    becomes the field's error (with the key path); the function's result replaces the value unless it
    returns ``None`` (a pure check)."""
    def validate(value):
        try:
            result = func(value)
        except TilesparseError as exc:
            raise ValueError(str(exc)) from None
        return value if result is None else result

    validate.__name__ = getattr(func, "__name__", "validate")
    return validate


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` inside a validator unless ``condition`` holds."""
    if not condition:
        raise ValueError(message)


__all__ = ["ConfigModel", "UserConfig", "validator", "Pair", "config_error", "key_path", "closest", "check"]
