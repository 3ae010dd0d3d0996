import gzip
import zlib

import pytest

from tilesparse.data import embedded
from tilesparse.errors import TilesparseError


def test_unknown_embedded_text():
    with pytest.raises(TilesparseError, match="unknown embedded text"):
        embedded.embedded_text("ulysses")


@pytest.mark.parametrize("name,message", [
    ("emma", "could not download Debian package r-cran-janeaustenr"),
    ("debian-reference", "'debian-reference' is not available .*debian-reference-en"),
])
def test_unreachable_source_is_a_clear_error(tmp_cache, monkeypatch, name, message):
    def fail(package, dest):
        raise TilesparseError(f"could not download Debian package {package}: unreachable")

    monkeypatch.setattr(embedded, "apt_download_unpack", fail)
    with pytest.raises(TilesparseError, match=message):
        embedded.embedded_text(name)


def test_rdata_reader_roundtrip(tmp_path):
    """Build a lazy-load database the way R does (gzip'd index + length-prefixed zlib blobs) and read it."""
    rdata = pytest.importorskip("rdata")
    if not hasattr(rdata, "conversion") or not hasattr(rdata.conversion, "convert_python_to_r_object"):
        pytest.skip("this rdata version cannot write R objects")
    from rdata.unparser import unparse_data

    def ser(obj):
        return unparse_data(rdata.conversion.convert_python_to_r_data(obj), file_format="binary",
                            file_type="rds")

    lines = ["CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich"]
    import numpy as np

    blob = ser(np.array(lines, dtype=object))
    payload = len(blob).to_bytes(4, "big") + zlib.compress(blob)
    (tmp_path / "Rdata.rdb").write_bytes(payload)
    index = {"variables": {"emma": np.array([0, len(payload)], dtype=np.int32)},
             "references": {}, "compressed": np.array([True])}
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(ser(index)))
    objs = embedded.read_rdata_objects(tmp_path / "Rdata")
    assert embedded._as_text(objs["emma"]) == "\n".join(lines)


@pytest.mark.slow
def test_embedded_austen_and_moby_dick():
    pp = embedded.embedded_text("prideprejudice")
    assert pp.startswith("PRIDE AND PREJUDICE") and "truth universally acknowledged" in pp
    assert "Call me Ishmael" in embedded.embedded_text("mobydick")
    assert len(embedded.embedded_text("emma")) > 800_000
