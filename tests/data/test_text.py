import json
import sys
import types

import pytest
import torch

from conftest import make_char_tokenizer
from tilesparse.data import calibration_segments, eval_windows, load_text, tokenize
from tilesparse.errors import TilesparseError


def test_text_file(text_file):
    src = load_text(str(text_file))
    assert src.name == "text.txt" and src.text.startswith("It is a truth")


def test_jsonl_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in ["first doc", "second doc"]) + "\n")
    assert load_text(str(p)).text == "first doc\n\nsecond doc"
    p.write_text('{"body": 1}\n')
    with pytest.raises(TilesparseError, match="'text' field"):
        load_text(str(p))


@pytest.mark.parametrize("content,msg", [("", "is empty"), ("  \n\n ", "is empty")])
def test_empty_text(tmp_path, content, msg):
    p = tmp_path / "empty.txt"
    p.write_text(content)
    with pytest.raises(TilesparseError, match=msg):
        load_text(str(p))


def test_missing_and_non_utf8(tmp_path):
    with pytest.raises(TilesparseError, match="neither an existing file"):
        load_text(str(tmp_path / "nope.txt"))
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(TilesparseError, match="not UTF-8"):
        load_text(str(p))


def test_hf_dataset_source_uses_datasets(monkeypatch):
    calls = {}

    def load_dataset(path, config=None, split=None, **kw):
        calls.update(path=path, config=config, split=split)
        return [{"text": " = Title = "}, {"text": "body line"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = load_text("wikitext2")
    assert calls == {"path": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
    assert src.text == " = Title = \n\nbody line"


def test_hf_dataset_failure_is_clear(monkeypatch):
    def load_dataset(*a, **kw):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(TilesparseError, match="cannot load dataset 'wikitext2'"):
        load_text("wikitext2")


def test_eval_windows_layout():
    ids = torch.arange(1000)
    w = eval_windows(ids, 100, 3)
    assert w.shape == (3, 100) and torch.equal(w.reshape(-1), ids[:300])
    wb = eval_windows(ids, 100, 3, bos_id=7)
    assert wb.shape == (3, 100) and (wb[:, 0] == 7).all()
    assert torch.equal(wb[:, 1:].reshape(-1), ids[:297])
    assert eval_windows(ids, 100).shape[0] == 10


@pytest.mark.parametrize("kwargs,msg", [
    (dict(seqlen=0), "at least 2"),
    (dict(seqlen=-5), "at least 2"),
    (dict(seqlen=300, context=256), "exceeds the model's context"),
    (dict(seqlen=2000), "shorter than one window"),
])
def test_eval_windows_errors(kwargs, msg):
    with pytest.raises(TilesparseError, match=msg):
        eval_windows(torch.arange(1000), **kwargs)


def test_calibration_segments_deterministic():
    ids = torch.arange(5000)
    a = calibration_segments(ids, 8, 64, seed=1)
    b = calibration_segments(ids, 8, 64, seed=1)
    c = calibration_segments(ids, 8, 64, seed=2)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous slices of the text
    with pytest.raises(TilesparseError, match="too short"):
        calibration_segments(torch.arange(10), 2, 64)


def test_tokenize_char_tokenizer():
    tok = make_char_tokenizer()
    ids = tokenize(tok, "ab\nc")
    assert ids.dtype == torch.long and ids.numel() == 4
