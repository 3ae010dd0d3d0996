"""The out-of-domain non-fiction text (Debian Reference): HTML -> prose extraction, registry, fetch."""

import argparse
import re
import shutil
from pathlib import Path

import pytest

from tilesparse.data import (EMBEDDED_TEXTS, OOD_EVAL_TEXTS, OPTIONAL_TEXTS, TRAIN_TEXTS, check_training_text,
                             embedded, load_text)
from tilesparse.data.prose import html_to_prose, manual_pages, manual_prose
from tilesparse.errors import TilesparseError

PAGE = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<html xmlns="http://www.w3.org/1999/xhtml">
  <head><title>Chapter 1. GNU/Linux tutorials</title><style>p { color: red }</style></head>
  <body>
    <div class="navheader"><table summary="Navigation header"><tr><th>Chapter 1. Tutorials</th></tr>
      <tr><td><a href="pr01.en.html"><p>Prev page link text</p></a></td></tr></table><hr/></div>
    <div class="chapter">
      <div class="titlepage"><h1 class="title"><a id="_tutorials"/>Chapter 1. GNU/Linux tutorials</h1></div>
      <div class="toc"><p><strong>Table of Contents</strong></p>
        <dl class="toc"><dt><span class="section"><a href="#x">1.1. Console basics</a></span></dt></dl></div>
      <p>Learning a computer   system is like
         learning a new foreign language.&#160;Tutorial books &amp; documents are helpful<sup>[<a
         href="#ftn1" class="footnote">1</a>]</sup>, but you have to practice it yourself.</p>
      <h2 class="title">1.1. Console basics</h2>
      <p>Type <code class="literal">ls -la</code> to list the files in the current directory.<br/>It
         also shows hidden files.</p>
      <p>Short one.</p>
      <p><code class="literal">/etc/apt/sources.list.d/debian.sources</code> and
         <code class="literal">/etc/apt/apt.conf.d/</code></p>
      <pre class="screen">$ echo "this is a command line" &gt; /dev/null
$ ls -la</pre>
      <div class="table"><p class="title"><strong>Table 1.1. List of packages</strong></p>
        <div class="table-contents"><table class="table" summary="List of packages">
          <thead><tr><th>package</th><th>size</th></tr></thead>
          <tbody><tr><td><p>This cell paragraph is not running prose.</p></td><td>42</td></tr></tbody>
        </table></div></div>
      <div class="note"><table border="0" summary="Note"><tr><td><img alt="[Note]" src="note.png"/></td></tr>
        <tr><td><p>A note box is drawn as a table, but its text is prose worth keeping.</p></td></tr>
      </table></div>
      <dl class="variablelist"><dt><span class="term">Term heading</span></dt>
        <dd><p>The definition of the term is a sentence that stays.</p></dd></dl>
      <div class="itemizedlist"><ul class="itemizedlist"><li class="listitem"><p>Caf\u0065\u0301 culture is
        part of the list item text here.</p></li></ul></div>
      <div class="footnotes"><div class="footnote"><p><sup>[1] </sup>The footnote text is dropped here.</p>
      </div></div>
    </div>
    <div class="navfooter"><p>Next chapter link text goes here</p></div>
  </body>
</html>
"""

EXPECTED = [
    ("Learning a computer system is like learning a new foreign language. Tutorial books & documents are "
     "helpful, but you have to practice it yourself."),
    "Type ls -la to list the files in the current directory. It also shows hidden files.",
    "A note box is drawn as a table, but its text is prose worth keeping.",
    "The definition of the term is a sentence that stays.",
    "Caf\u00e9 culture is part of the list item text here.",
]
_TAGS = ("html|head|body|title|meta|link|style|script|div|span|p|a|img|br|hr|pre|code|tt|sup|strong|em|b|i|"
         "table|thead|tbody|tr|td|th|col|colgroup|ul|ol|li|dl|dt|dd|h[1-6]")
MARKUP = re.compile(rf"</?({_TAGS})(\s[^<>]*)?/?>|&(#[0-9]+|#x[0-9a-fA-F]+|[a-zA-Z]+);", re.IGNORECASE)


def test_html_to_prose_keeps_only_clean_paragraphs():
    paras = html_to_prose(PAGE)
    assert paras == EXPECTED
    assert html_to_prose(PAGE) == paras  # deterministic
    assert not any(MARKUP.search(p) for p in paras)


def test_html_to_prose_is_robust_to_sloppy_html():
    assert html_to_prose("<p>An unclosed paragraph of five words<p>and a second one of six words</div>") == [
        "An unclosed paragraph of five words", "and a second one of six words"]
    assert html_to_prose("") == [] and html_to_prose("no tags at all here, none") == []


def test_manual_prose_reads_pages_in_reading_order(tmp_path):
    for name, word in [("ch02.en.html", "second"), ("apa.en.html", "appendix"), ("pr01.en.html", "preface"),
                       ("ch01.en.html", "first"), ("index.en.html", "index"), ("ch01.fr.html", "french")]:
        (tmp_path / name).write_text(f"<p>This is the {word} page of the manual.</p>", encoding="utf-8")
    assert [p.name for p in manual_pages(tmp_path)] == ["pr01.en.html", "ch01.en.html", "ch02.en.html",
                                                         "apa.en.html"]
    text = manual_prose(tmp_path)
    assert text == ("This is the preface page of the manual.\n\nThis is the first page of the manual.\n\n"
                    "This is the second page of the manual.\n\nThis is the appendix page of the manual.\n")


def test_registry_and_training_refusal():
    assert EMBEDDED_TEXTS["debian-reference"] == "Debian Reference"
    assert "debian-reference" in OOD_EVAL_TEXTS and "debian-reference" in OPTIONAL_TEXTS
    assert "debian-reference" not in TRAIN_TEXTS
    with pytest.raises(TilesparseError, match="'debian-reference' is an evaluation text"):
        check_training_text("debian-reference")
    check_training_text("austen-train")  # training texts still pass


def _fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "deb"
    pages = root / "usr" / "share" / "debian-reference"
    pages.mkdir(parents=True)
    (pages / "ch01.en.html").write_text(PAGE, encoding="utf-8")
    return root


def test_load_text_fetches_once_and_caches(tmp_cache, tmp_path, monkeypatch):
    calls = []

    def fake_download(package, dest):
        calls.append(package)
        src = _fake_package(tmp_path)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest

    monkeypatch.setattr(embedded, "apt_download_unpack", fake_download)
    src = load_text("debian-reference")
    assert calls == ["debian-reference-en"]
    assert src.name == "Debian Reference" and src.text == "\n\n".join(EXPECTED) + "\n"
    cached = tmp_cache / "texts" / "debian-reference.txt"
    assert cached.read_text(encoding="utf-8") == src.text
    assert not [p for p in cached.parent.iterdir() if ".tmp-" in p.name]  # atomic write, no leftovers
    assert load_text("debian-reference").text == src.text and calls == ["debian-reference-en"]


def test_fetch_skips_the_optional_text_with_one_line(tmp_cache, tmp_path, monkeypatch, capsys):
    """The required sources are fetched; the optional one failing is one line, and fetch still succeeds."""
    from tilesparse.commands import fetch
    from tilesparse.models import embedded as model_embedded

    fetched = []

    def fake_text(key):
        if key in OPTIONAL_TEXTS:
            return embedded.embedded_text(key)
        fetched.append(key)
        return "text"

    def fail(package, dest):
        raise TilesparseError(f"could not download Debian package {package}: E: Unable to locate package")

    monkeypatch.setattr("tilesparse.data.embedded_text", fake_text)
    monkeypatch.setattr(model_embedded, "default_model_dir", lambda: tmp_path / "model")
    monkeypatch.setattr(embedded, "apt_download_unpack", fail)
    assert fetch.run(argparse.Namespace(model=[])) == 0
    out = capsys.readouterr().out.splitlines()
    assert set(fetched) == set(EMBEDDED_TEXTS) - set(OPTIONAL_TEXTS)
    skipped = [line for line in out if line.startswith("skipped the optional text debian-reference:")]
    assert len(skipped) == 1 and "debian-reference-en" in skipped[0]
    assert out[-1].startswith("cache ") and f"{len(EMBEDDED_TEXTS) - 1} texts" in out[-1]


@pytest.mark.slow
def test_real_debian_reference(tmp_cache):
    """Fetch debian-reference-en into an empty cache: enough clean prose for the perplexity protocol."""
    try:
        text = embedded.embedded_text("debian-reference")
    except TilesparseError as exc:
        pytest.skip(f"Debian archive not reachable: {exc}")
    assert (tmp_cache / "texts" / "debian-reference.txt").is_file()
    words = text.split()
    assert len(words) >= 20_000  # >= 6k tokens by a wide margin (about 1.6 tokens per word)
    assert "Debian" in text and "package" in text
    assert not MARKUP.search(text), MARKUP.search(text)
    assert "\n\n\n" not in text and "  " not in text and "\t" not in text
    paragraphs = text.strip().split("\n\n")
    assert len(paragraphs) > 1000 and all(len(p.split()) >= 4 for p in paragraphs)
