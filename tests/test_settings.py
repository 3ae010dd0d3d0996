"""tilesparse.settings: parsing of every TILESPARSE_* variable, one-line errors, and the rule that no
other module reads these variables from the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tilesparse
from tilesparse import settings as ts_settings
from tilesparse.errors import TilesparseError
from tilesparse.settings import Settings, env_name, setting, settings

FIELDS = list(Settings.model_fields)
SRC = Path(tilesparse.__file__).parent


@pytest.fixture
def clean_env(monkeypatch):
    for f in FIELDS:
        monkeypatch.delenv(env_name(f), raising=False)
    return monkeypatch


DEFAULTS = {"cache": None, "bigbench_sdist": None, "mma": True, "stream": True, "autotune": True, "autotune_cache": True,
            "pdl": False, "q4_mma": True, "gemm": True, "tilelang": True, "compiled_unpack": True, "fused_mask": None,
            "fused_blocks": None}

SWITCHES = ("mma", "stream", "autotune", "autotune_cache", "pdl", "q4_mma", "gemm", "tilelang", "compiled_unpack")

# (field, text, value): every value the module docstring documents, plus empty = default
CASES = [
    ("cache", "/tmp/ts-cache", Path("/tmp/ts-cache")),
    ("cache", "~/ts-cache", Path("~/ts-cache").expanduser()),
    ("cache", "", None),
    ("bigbench_sdist", "/data/bigbench-1.0.0.tar.gz", Path("/data/bigbench-1.0.0.tar.gz")),
    ("bigbench_sdist", "", None),
    *[(f, t, t == "1") for f in SWITCHES for t in ("0", "1")],
    *[(f, "", DEFAULTS[f]) for f in SWITCHES],
    *[("fused_mask", t, True) for t in ("1", "on", "true", "yes", "ON", " on ")],
    *[("fused_mask", t, False) for t in ("0", "off", "false", "no", "Off")],
    *[("fused_mask", t, None) for t in ("auto", "AUTO", "")],
    ("fused_blocks", "8,8,4", (8, 8, 4)),
    ("fused_blocks", "32, 64, 8", (32, 64, 8)),
    ("fused_blocks", "", None),
]

BAD = [
    ("mma", "maybe", "must be 0"), ("stream", "true", "must be 0"), ("stream", "yes", "must be 0"),
    ("autotune", "2", "must be 0"), ("pdl", " 1", "must be 0"), ("q4_mma", "on", "must be 0"),
    ("fused_mask", "maybe", "0/off, 1/on or auto"),
    ("fused_blocks", "8,8", "rows,groups,warps"), ("fused_blocks", "8,x,4", "rows,groups,warps"),
    ("fused_blocks", "8,6,4", "powers of two"), ("fused_blocks", "0,8,4", "powers of two"),
]


def test_defaults(clean_env):
    assert settings().model_dump() == DEFAULTS
    assert {f: setting(f) for f in FIELDS} == DEFAULTS


@pytest.mark.parametrize("field,text,want", CASES)
def test_documented_values(clean_env, field, text, want):
    clean_env.setenv(env_name(field), text)
    assert getattr(settings(), field) == want
    assert setting(field) == want


@pytest.mark.parametrize("field,text,msg", BAD)
def test_bad_value_is_a_one_line_error_naming_the_variable(clean_env, field, text, msg):
    clean_env.setenv(env_name(field), text)
    for read in (settings, lambda: setting(field)):
        with pytest.raises(TilesparseError) as info:
            read()
        text_ = str(info.value)
        assert text_.startswith(env_name(field)) and msg in text_ and "\n" not in text_, text_
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_setting_follows_the_environment(clean_env):
    assert setting("pdl") is False
    clean_env.setenv("TILESPARSE_PDL", "1")
    assert setting("pdl") is True
    clean_env.setenv("TILESPARSE_PDL", "0")
    assert setting("pdl") is False
    clean_env.setenv("TILESPARSE_PDL", "bad")
    with pytest.raises(TilesparseError, match="TILESPARSE_PDL"):
        setting("pdl")
    with pytest.raises(KeyError):
        setting("no_such_setting")


def test_unrelated_variables_are_ignored(clean_env):
    clean_env.setenv("TILESPARSE_SLOW", "all")  # test-suite switch, not a library setting
    clean_env.setenv("TILESPARSE_VENV", "/nowhere")
    assert settings().model_dump() == DEFAULTS


def test_every_field_is_described_and_documented():
    doc = ts_settings.__doc__
    for f, info in Settings.model_fields.items():
        assert info.description, f
        assert f"``{env_name(f)}``" in doc, f


def test_package_docstring_points_here():
    assert "tilesparse.settings" in tilesparse.__doc__


# ---------------------------------------------------------------- no TILESPARSE_* reads outside settings.py
def _is_os_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ`` (``from os import environ``)."""
    return ((isinstance(node, ast.Attribute) and node.attr == "environ" and isinstance(node.value, ast.Name)
             and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "environ"))


def _is_getenv(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "getenv" and isinstance(node.value, ast.Name)
             and node.value.id == "os") or (isinstance(node, ast.Name) and node.id == "getenv"))


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments."""
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = node.value.value
    return out


def _names_tilesparse_var(key: ast.AST | None, consts: dict[str, str]) -> bool:
    if isinstance(key, ast.Constant) and isinstance(key.value, str):
        return key.value.startswith("TILESPARSE_")
    if isinstance(key, ast.Name):
        return consts.get(key.id, "").startswith("TILESPARSE_")
    if isinstance(key, ast.JoinedStr) and key.values:
        return _names_tilesparse_var(key.values[0], consts)
    if isinstance(key, ast.BinOp) and isinstance(key.op, ast.Add):
        return _names_tilesparse_var(key.left, consts)
    return False


def env_reads(source: str) -> list[int]:
    """Line numbers where ``source`` reads a ``TILESPARSE_*`` variable from the process environment:
    ``os.environ.get(k)``, ``os.environ[k]`` (not as an assignment target), ``k in os.environ``,
    ``os.getenv(k)``, ``os.environ.pop(k)`` / ``setdefault(k)``, with ``k`` a literal, a module constant or
    an f-string starting with ``TILESPARSE_``. Setting a variable (``os.environ[k] = v``, an env dict for a
    subprocess) is not a read."""
    tree = ast.parse(source)
    consts = _string_constants(tree)
    hits = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call):
            f = node.func
            if ((isinstance(f, ast.Attribute) and f.attr in ("get", "pop", "setdefault") and _is_os_environ(f.value))
                    or _is_getenv(f)):
                key = node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_os_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(isinstance(o, (ast.In, ast.NotIn)) for o in node.ops) \
                and any(_is_os_environ(c) for c in node.comparators):
            key = node.left
        if key is not None and _names_tilesparse_var(key, consts):
            hits.append(node.lineno)
    return sorted(set(hits))


@pytest.mark.parametrize("snippet", [
    'import os\nx = os.environ.get("TILESPARSE_MMA", "1")',
    'import os\nx = os.environ["TILESPARSE_CACHE"]',
    'import os\nx = os.getenv("TILESPARSE_PDL")',
    'from os import environ\nx = environ.get("TILESPARSE_PDL")',
    'import os\nENV = "TILESPARSE_CACHE"\ndef f():\n    return os.environ.get(ENV)',
    'import os\nx = "TILESPARSE_STREAM" in os.environ',
    'import os\nn = "MMA"\nx = os.environ.get(f"TILESPARSE_{n}")',
    'import os\nx = os.environ.get("TILESPARSE_" + "MMA")',
])
def test_checker_finds_reads(snippet):
    assert env_reads(snippet)


@pytest.mark.parametrize("snippet", [
    'import os\nos.environ["TILESPARSE_STREAM"] = "1"',
    'import os\nenv = {**os.environ, "TILESPARSE_CACHE": "/tmp/c"}',
    'import os\nx = os.environ.get("WORLD_SIZE", "1")',
    'import os\nx = os.environ.get("TRITON_INTERPRET", "0")',
])
def test_checker_ignores_non_reads(snippet):
    assert not env_reads(snippet)


def test_only_settings_reads_tilesparse_variables():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20 and SRC / "settings.py" in files
    offenders = {str(p.relative_to(SRC)): lines for p in files if p.name != "settings.py" or p.parent != SRC
                 for lines in [env_reads(p.read_text())] if lines}
    assert not offenders, f"read TILESPARSE_* through tilesparse.settings instead: {offenders}"
