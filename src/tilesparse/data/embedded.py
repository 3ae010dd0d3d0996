"""Embedded texts: six Austen novels (Debian ``r-cran-janeaustenr``) and Moby Dick (``r-cran-tokenizers``).

The R data files inside the packages are read with the pure-Python ``rdata`` package: the ``.rdx``
file is a gzip'd index of ``(offset, length)`` per object; each blob of the ``.rdb`` file is a
4-byte big-endian length followed by zlib-compressed serialized R data. Texts are cached as UTF-8
files, so this runs once per machine.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import warnings
import zlib
from pathlib import Path

from ..errors import TilesparseError
from ..fetch import apt_download_unpack
from ..paths import cache_dir

AUSTEN = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "sensesensibility": "Sense and Sensibility",
    "northangerabbey": "Northanger Abbey",
    "prideprejudice": "Pride and Prejudice",
    "persuasion": "Persuasion",
}
TRAIN_TEXTS = ("emma", "mansfieldpark", "sensesensibility", "northangerabbey")
EVAL_TEXTS = ("prideprejudice", "persuasion")
OTHER_TEXTS = {"mobydick": "Moby Dick"}
EMBEDDED_TEXTS = {**AUSTEN, **OTHER_TEXTS}

_SOURCES = {  # Debian package -> R package name whose data/Rdata holds the objects
    "r-cran-janeaustenr": "janeaustenr",
    "r-cran-tokenizers": "tokenizers",
}
_TEXT_PACKAGE = {**{k: "r-cran-janeaustenr" for k in AUSTEN}, "mobydick": "r-cran-tokenizers"}


def read_rdata_objects(rdata_base: Path) -> dict[str, object]:
    """Read every object of an R lazy-load database (``<base>.rdx`` + ``<base>.rdb``)."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(
            rdata.parser.parse_data(gzip.decompress(Path(f"{rdata_base}.rdx").read_bytes()))
        )
        blob = Path(f"{rdata_base}.rdb").read_bytes()
        objects = {}
        for name, (offset, length) in index["variables"].items():
            chunk = blob[int(offset): int(offset) + int(length)]
            raw = zlib.decompress(chunk[4:])
            objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return objects


def _as_text(obj) -> str:
    lines = [str(x) for x in obj]
    text = "\n".join(lines) if len(lines) > 1 else lines[0]
    return text.replace("\r\n", "\n").lstrip("\ufeff")


def _text_path(name: str) -> Path:
    return cache_dir() / "texts" / f"{name}.txt"


def ensure_texts(package: str) -> None:
    """Fetch one Debian package and cache all of its texts (idempotent)."""
    r_name = _SOURCES[package]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            root = apt_download_unpack(package, Path(tmp))
        except TilesparseError as exc:
            raise TilesparseError(f"the embedded texts are not available ({exc}); check that Debian's package "
                                  f"archive can be reached (apt-get update), or give texts as file paths") from None
        base = root / "usr" / "lib" / "R" / "site-library" / r_name / "data" / "Rdata"
        if not Path(f"{base}.rdx").is_file():
            raise TilesparseError(f"Debian package {package} has no R data at {base}.rdx")
        objects = read_rdata_objects(base)
    out_dir = cache_dir() / "texts"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, obj in objects.items():
        if name not in EMBEDDED_TEXTS:
            continue
        target = _text_path(name)
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(_as_text(obj))
        os.replace(tmp_name, target)


def embedded_text(name: str) -> str:
    """Text of an embedded book by key (``emma``, ``prideprejudice``, ``mobydick``, ...)."""
    if name not in EMBEDDED_TEXTS:
        raise TilesparseError(f"unknown embedded text {name!r}; choose one of {sorted(EMBEDDED_TEXTS)}")
    path = _text_path(name)
    if not path.is_file():
        ensure_texts(_TEXT_PACKAGE[name])
    if not path.is_file():
        raise TilesparseError(f"embedded text {name!r} not found in {_TEXT_PACKAGE[name]}")
    return path.read_text(encoding="utf-8")
