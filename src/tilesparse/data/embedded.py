"""Embedded texts: six Austen novels (Debian ``r-cran-janeaustenr``), Moby Dick (``r-cran-tokenizers``) and,
optional, the Debian Reference manual (``debian-reference-en``) as out-of-domain non-fiction prose.

The R data files inside the packages are read with the pure-Python ``rdata`` package: the ``.rdx``
file is a gzip'd index of ``(offset, length)`` per object; each blob of the ``.rdb`` file is a
4-byte big-endian length followed by zlib-compressed serialized R data. The Debian Reference (GPL-2+,
Osamu Aoki) is the prose paragraphs of its English HTML pages, extracted by :mod:`.prose` (no code
listings, tables or navigation); its text follows the package version Debian serves when first fetched.
Texts are cached as UTF-8 files (written atomically), so this runs once per machine.
"""

from __future__ import annotations

import gzip
import tempfile
import warnings
import zlib
from pathlib import Path

from ..atomic import atomic_write_text
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
PROSE_TEXTS = {"debian-reference": "Debian Reference"}  # non-fiction, out of domain
EMBEDDED_TEXTS = {**AUSTEN, **OTHER_TEXTS, **PROSE_TEXTS}
# evaluation only, out of domain (never learned or calibrated on, like EVAL_TEXTS)
OOD_EVAL_TEXTS = ("mobydick", "debian-reference")
# fetched by ``tilesparse fetch`` when their package can be had, skipped with a note otherwise
OPTIONAL_TEXTS = ("debian-reference",)

_SOURCES = {  # Debian package -> R package name whose data/Rdata holds the objects
    "r-cran-janeaustenr": "janeaustenr",
    "r-cran-tokenizers": "tokenizers",
}
_MANUALS = {  # Debian package -> (text key, folder of its English DocBook HTML pages)
    "debian-reference-en": ("debian-reference", "usr/share/debian-reference"),
}
_TEXT_PACKAGE = {**{k: "r-cran-janeaustenr" for k in AUSTEN}, "mobydick": "r-cran-tokenizers",
                 "debian-reference": "debian-reference-en"}


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


def _write_text(name: str, text: str) -> None:
    atomic_write_text(text, _text_path(name))


def ensure_manual(package: str) -> None:
    """Fetch a Debian package of an HTML manual and cache its prose (see :mod:`.prose`)."""
    from .prose import manual_prose

    name, folder = _MANUALS[package]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            root = apt_download_unpack(package, Path(tmp))
        except TilesparseError as exc:
            raise TilesparseError(f"the embedded text {name!r} is not available ({exc}); check that Debian's "
                                  f"package archive can be reached (apt-get update), or give a text file "
                                  f"path") from None
        doc_dir = root / folder
        if not doc_dir.is_dir():
            raise TilesparseError(f"Debian package {package} has no HTML pages at /{folder}")
        text = manual_prose(doc_dir)
    if not text.strip():
        raise TilesparseError(f"no prose found in the HTML pages of Debian package {package}")
    _write_text(name, text)


def ensure_texts(package: str) -> None:
    """Fetch one Debian package and cache all of its texts (idempotent)."""
    if package in _MANUALS:
        ensure_manual(package)
        return
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
    for name, obj in objects.items():
        if name in EMBEDDED_TEXTS:
            _write_text(name, _as_text(obj))


def embedded_text(name: str) -> str:
    """Text of an embedded text by key (``emma``, ``prideprejudice``, ``mobydick``, ``debian-reference``, ...)."""
    if name not in EMBEDDED_TEXTS:
        raise TilesparseError(f"unknown embedded text {name!r}; choose one of {sorted(EMBEDDED_TEXTS)}")
    path = _text_path(name)
    if not path.is_file():
        ensure_texts(_TEXT_PACKAGE[name])
    if not path.is_file():
        raise TilesparseError(f"embedded text {name!r} not found in {_TEXT_PACKAGE[name]}")
    return path.read_text(encoding="utf-8")
