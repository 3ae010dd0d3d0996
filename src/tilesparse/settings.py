"""Library settings read from ``TILESPARSE_*`` environment variables.

Every variable the library reads is a field of :class:`Settings`; nothing else in ``tilesparse`` reads
them from ``os.environ``. An unset or empty variable means the default. A value outside the listed ones
raises a one-line :class:`~tilesparse.errors.TilesparseError` that names the variable.

=============================  ============  ========================================================
variable                       default       meaning
=============================  ============  ========================================================
``TILESPARSE_CACHE``           unset         Cache folder (model, texts, task files); unset:
                                             ``~/.cache/tilesparse``. ``~`` is expanded.
``TILESPARSE_BIGBENCH_SDIST``  unset         A local ``bigbench-1.0.0.tar.gz`` (or a folder of its
                                             ``task.json`` files) that enables the ``bb_*`` zero-shot
                                             tasks; never downloaded.
``TILESPARSE_MMA``             ``1``         ``0``: the CUDA sparse-tensor-core (mma) kernels are not
                                             autotuning candidates (Triton only), e.g. for a model
                                             spread over several GPUs.
``TILESPARSE_STREAM``          ``1``         ``0``: the Triton stream kernel is not a candidate.
``TILESPARSE_GEMM``            ``1``         ``0``: the hybrid GEMM on sparse tensor cores
                                             (``kernels.cuda_gemm``, 16-64 tokens) is not an autotuning
                                             candidate.
``TILESPARSE_TILELANG``        ``1``         ``0``: the TileLang GEMMs of column-shared layers
                                             (``kernels.tilelang_columns``, 16+ tokens) are not
                                             autotuning candidates.
``TILESPARSE_AUTOTUNE``        ``1``         ``0``: no autotuning; the fixed heuristic picks each
                                             layer's kernel configuration.
``TILESPARSE_AUTOTUNE_CACHE``  ``1``         ``0``: tuned choices are neither read from nor written to
                                             the cache (``autotune/`` in the cache folder, per GPU
                                             and library versions).
``TILESPARSE_PDL``             ``0``         ``1``: launch the mma kernels as programmatic dependents
                                             (compute capability 9.0+).
``TILESPARSE_Q4_MMA``          ``1``         ``0``: 4-bit layers run the Triton kernel where the CUDA
                                             sparse-tensor-core kernel (``kernels.cuda_mma_q4``)
                                             would apply.
``TILESPARSE_COMPILED_UNPACK`` ``1``         ``0``: under ``torch.compile``, a hybrid layer given more than
                                             64 tokens (a 4-bit one: more than 16) is one
                                             ``tilesparse::hybrid_linear`` (``_q4``) call rather than
                                             ``F.linear`` on the ``tilesparse::hybrid_unpack`` (``_q4``)
                                             Triton operator (which the compiler launches itself); read
                                             when a layer is built or moved.
``TILESPARSE_FUSED_MASK``      ``auto``      Fused Triton mask kernels while learning: ``1``/``on``/
                                             ``true``/``yes``, ``0``/``off``/``false``/``no``, or
                                             ``auto`` (on for CUDA weights when Triton imports).
``TILESPARSE_FUSED_BLOCKS``    unset         Program block of the fused mask kernels as
                                             ``rows,groups,warps`` (powers of two); unset: the
                                             kernels' default ``32,32,8``.
=============================  ============  ========================================================

The on/off switches take exactly ``0`` or ``1``. The candidate switches (``MMA``, ``STREAM``, ``GEMM``,
``TILELANG``) are read once, when :mod:`tilesparse.kernels.ops` is imported; the others on every use.

:func:`settings` reads all variables now (a fraction of a millisecond); :func:`setting` returns one
value for code that runs per kernel launch or per layer call: it looks its variable up in the
environment and re-validates only when the text changed. The variables used by the test suite and the
scripts (``TILESPARSE_SLOW``, ``TILESPARSE_VENV``) are not library settings and are not read here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from .errors import TilesparseError

ENV_PREFIX = "TILESPARSE_"


def _switch(default: bool):
    """A ``0``/``1`` switch; empty means ``default``."""
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if value == "":
            return default
        if value in ("0", "1"):
            return value == "1"
        raise ValueError("must be 0 (off) or 1 (on)")
    return BeforeValidator(parse)


def _path(value: Any) -> Any:
    if value is None or value == "":
        return None
    return Path(value).expanduser()


def _fused_mask(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("1", "on", "true", "yes"):
        return True
    if text in ("0", "off", "false", "no"):
        return False
    raise ValueError("must be 0/off, 1/on or auto")


def _blocks(value: Any) -> Any:
    if value is None or isinstance(value, tuple):
        return value
    if value == "":
        return None
    try:
        rows, groups, warps = (int(x) for x in str(value).split(","))
    except ValueError:
        raise ValueError("must be 'rows,groups,warps'") from None
    if any(v <= 0 or v & (v - 1) for v in (rows, groups, warps)):
        raise ValueError("values must be powers of two")
    return rows, groups, warps


class Settings(BaseSettings):
    """The ``TILESPARSE_*`` variables (field ``x`` is ``TILESPARSE_X``); see the module docstring."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, enable_decoding=False, frozen=True)

    cache: Annotated[Path | None, BeforeValidator(_path)] = Field(
        None, description="Cache folder for the model, texts and task files; None: ~/.cache/tilesparse.")
    bigbench_sdist: Annotated[Path | None, BeforeValidator(_path)] = Field(
        None, description="Local bigbench-1.0.0.tar.gz or folder of its task.json files enabling the bb_* "
                          "zero-shot tasks; None: those tasks are unavailable (never downloaded).")
    mma: Annotated[bool, _switch(True)] = Field(
        True, description="CUDA sparse-tensor-core (mma) kernels among the autotuning candidates "
                          "(0: Triton only). Default 1.")
    stream: Annotated[bool, _switch(True)] = Field(
        True, description="Triton stream kernel among the autotuning candidates. Default 1.")
    gemm: Annotated[bool, _switch(True)] = Field(
        True, description="The hybrid GEMM on sparse tensor cores (kernels.cuda_gemm) among the autotuning "
                          "candidates at 16-64 tokens. Default 1.")
    tilelang: Annotated[bool, _switch(True)] = Field(
        True, description="Column-shared layers' GEMMs through TileLang (kernels.tilelang_columns, sparse tensor "
                          "cores, 16+ tokens, compute capability 9.0, TileLang installed) among the autotuning "
                          "candidates. Default 1.")
    autotune: Annotated[bool, _switch(True)] = Field(
        True, description="Autotune each layer's kernel configuration on CUDA (0: fixed heuristic). Default 1.")
    autotune_cache: Annotated[bool, _switch(True)] = Field(
        True, description="Keep tuned kernel choices in the cache folder (per GPU and library versions), so a "
                          "new process does not tune again (0: tune in every process). Default 1.")
    pdl: Annotated[bool, _switch(False)] = Field(
        False, description="Launch the mma kernels as programmatic dependents on compute capability 9.0+. "
                           "Default 0.")
    q4_mma: Annotated[bool, _switch(True)] = Field(
        True, description="4-bit layers run the CUDA sparse-tensor-core kernel (kernels.cuda_mma_q4) where it "
                          "applies instead of the Triton kernel (0: Triton only). Default 1.")
    compiled_unpack: Annotated[bool, _switch(True)] = Field(
        True, description="Under torch.compile, hybrid layers given more than 64 tokens (4-bit ones: more than 16) "
                          "run as F.linear on the tilesparse::hybrid_unpack(_q4) Triton operator, launched by the "
                          "compiler (0: one tilesparse::hybrid_linear(_q4) call). Default 1.")
    fused_mask: Annotated[bool | None, BeforeValidator(_fused_mask)] = Field(
        None, description="Fused Triton mask kernels while learning: 1/on/true/yes, 0/off/false/no or auto "
                          "(None: on for CUDA weights when Triton imports). Default auto.")
    fused_blocks: Annotated[tuple[int, int, int] | None, BeforeValidator(_blocks)] = Field(
        None, description="Program block 'rows,groups,warps' (powers of two) of the fused mask kernels; "
                          "None: the kernels' default 32,32,8.")


@functools.cache
def env_name(field: str) -> str:
    """The environment variable of a :class:`Settings` field."""
    if field not in Settings.model_fields:
        raise KeyError(f"no setting {field!r}")
    return ENV_PREFIX + field.upper()


def _user_error(exc: ValidationError) -> TilesparseError:
    err = exc.errors()[0]
    name = ENV_PREFIX + str(err["loc"][0]).upper() if err.get("loc") else ENV_PREFIX + "*"
    msg = err["msg"].removeprefix("Value error, ")
    sep = " " if msg[:1].islower() else ": "
    return TilesparseError(f"{name}{sep}{msg}, got {err.get('input')!r}")


def settings() -> Settings:
    """All settings, read from the environment now."""
    try:
        return Settings()
    except ValidationError as exc:
        raise _user_error(exc) from None
    except SettingsError as exc:  # a variable the settings source itself could not read
        raise TilesparseError(f"{ENV_PREFIX}* variables: {exc}") from None


_ONE: dict[tuple[str, str | None], Any] = {}


def setting(field: str) -> Any:
    """One setting's current value: one environment look-up, validated again only when its text changed
    (for per-call code)."""
    raw = os.environ.get(env_name(field))
    key = (field, raw)
    try:
        return _ONE[key]
    except KeyError:
        pass
    inst = Settings.model_construct()
    if raw is not None:
        try:
            Settings.__pydantic_validator__.validate_assignment(inst, field, raw)
        except ValidationError as exc:
            raise _user_error(exc) from None
    value = _ONE[key] = getattr(inst, field)
    return value


__all__ = ["Settings", "settings", "setting", "env_name", "ENV_PREFIX"]
