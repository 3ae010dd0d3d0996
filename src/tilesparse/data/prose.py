"""Clean English prose from HTML manuals (DocBook XSL output), for out-of-domain evaluation text.

The extraction keeps the text of ``<p>`` paragraphs only and drops everything that is not running
prose: navigation bars, tables of contents, tables (but not the note/tip/warning boxes that DocBook draws
as tables), figure and table titles, code listings and screen sessions (``<pre>``), footnote markers and
footnotes, headings and definition-list terms. A paragraph is dropped when it is too short to be prose
(fewer than :data:`MIN_WORDS` words) or when inline code makes up most of it (more than
:data:`MAX_CODE_FRACTION` of its characters). Whitespace is normalised (one space inside a paragraph,
paragraphs separated by one blank line) and the text is NFC-normalised, so the result is a deterministic
function of the input bytes. Only the standard library is used.
"""

from __future__ import annotations

import re
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

MIN_WORDS = 4
MAX_CODE_FRACTION = 0.5
# classes whose whole subtree is not prose
_SKIP_CLASSES = frozenset({"navheader", "navfooter", "toc", "list-of-tables", "list-of-figures", "footnotes",
                           "screen", "programlisting", "literallayout", "synopsis", "cmdsynopsis",
                           "funcsynopsis", "titlepage"})
_SKIP_TAGS = frozenset({"head", "script", "style", "pre", "sup", "h1", "h2", "h3", "h4", "h5", "h6", "dt",
                        "caption", "thead"})
# DocBook draws these boxes as a table; their paragraphs are prose
_ADMONITIONS = frozenset({"note", "tip", "warning", "caution", "important"})
_CODE_TAGS = frozenset({"code", "tt", "kbd", "samp", "var"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
                        "source", "track", "wbr"})


class _ProseParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._stack: list[tuple[str, bool, bool]] = []  # (tag, skips its subtree, inside an admonition box)
        self._skip_depth = 0
        self._code_depth = 0
        self._para: list[str] | None = None
        self._code_chars = 0
        self.paragraphs: list[tuple[str, int]] = []  # (raw text, characters inside inline code)

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in _VOID_TAGS:
            if tag == "br" and self._para is not None:
                self._para.append(" ")
            return
        if tag == "p" and any(t == "p" for t, _, _ in self._stack):
            self.handle_endtag("p")  # a new paragraph closes an open one, as in a browser
        classes = set((dict(attrs).get("class") or "").split())
        in_box = bool(self._stack) and self._stack[-1][2]
        in_box = in_box or bool(classes & _ADMONITIONS)
        skip = (tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
                or (tag == "table" and not in_box) or (tag == "p" and "title" in classes))
        self._stack.append((tag, skip, in_box))
        self._skip_depth += skip
        if tag in _CODE_TAGS:
            self._code_depth += 1
        if tag == "p" and self._para is None and not self._skip_depth:
            self._para, self._code_chars = [], 0

    def handle_startendtag(self, tag: str, attrs) -> None:
        if tag == "br" and self._para is not None:
            self._para.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or not any(t == tag for t, _, _ in self._stack):
            return  # stray end tag
        while self._stack:  # close implicitly closed elements too
            t, skip, _ = self._stack.pop()
            self._skip_depth -= skip
            if t in _CODE_TAGS:
                self._code_depth -= 1
            if t == "p":
                self._end_paragraph()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._para is not None and not self._skip_depth:
            self._para.append(data)
            if self._code_depth:
                self._code_chars += len("".join(data.split()))

    def _end_paragraph(self) -> None:
        if self._para is not None and not any(t == "p" for t, _, _ in self._stack):
            self.paragraphs.append(("".join(self._para), self._code_chars))
            self._para = None

    def close(self) -> None:
        super().close()
        while self._stack:
            self.handle_endtag(self._stack[-1][0])


def html_to_prose(html: str) -> list[str]:
    """The prose paragraphs of one HTML page, cleaned (see the module docstring), in document order."""
    parser = _ProseParser()
    parser.feed(html)
    parser.close()
    out = []
    for raw, code_chars in parser.paragraphs:
        text = " ".join(unicodedata.normalize("NFC", raw).split())
        visible = len(text.replace(" ", ""))
        if len(text.split()) < MIN_WORDS or not visible or code_chars / visible > MAX_CODE_FRACTION:
            continue
        out.append(text)
    return out


_PAGE = re.compile(r"^(pr|ch|ap)([0-9a-z]+)\.en\.html$")
_PART_ORDER = {"pr": 0, "ch": 1, "ap": 2}


def manual_pages(doc_dir: Path) -> list[Path]:
    """The pages of a DocBook HTML manual in reading order: preface(s), chapters, appendices."""
    pages = [p for p in doc_dir.iterdir() if _PAGE.match(p.name)]
    return sorted(pages, key=lambda p: (_PART_ORDER[_PAGE.match(p.name).group(1)], p.name))


def manual_prose(doc_dir: Path) -> str:
    """Clean prose of a DocBook HTML manual folder: the paragraphs of all pages, one blank line apart."""
    paragraphs = []
    for page in manual_pages(doc_dir):
        paragraphs.extend(html_to_prose(page.read_text(encoding="utf-8")))
    return "\n\n".join(paragraphs) + "\n" if paragraphs else ""
