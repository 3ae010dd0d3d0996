"""Multiple-choice zero-shot items generated from a plain text (pure, seeded, deterministic).

Two item kinds, both as lm-eval ``multiple_choice`` docs ``{query, choices, gold, idx}`` with four
choices (chance 1/4):

- **next sentence** (:func:`build_next_sentence`): a passage of consecutive sentences; the choices
  are the sentence that really follows and three sentences from far away in the same book, of similar
  length and of the same kind (dialogue or narration).
- **word choice** (:func:`build_word_choice`): a passage that stops just before a content word of its
  last sentence; each choice is a candidate word followed by the rest of that sentence (so the words
  on both sides of the gap count). The candidates are the true word and three words of similar
  frequency in the book with the same last two letters (so mostly the same part of speech and
  inflection: the gap cannot be told by its grammar alone).

The builders take the text itself (see :func:`book_body` to strip a Project Gutenberg frame) and
make items along one seeded permutation of the candidate positions until there are ``limit``: a
smaller limit selects a prefix of a larger one. Each item's distractors and choice order come from its
own seeded generator, so they do not depend on ``limit`` either.
"""

from __future__ import annotations

import random
import re
import zlib
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass

from .cloze import STOPWORDS, normalize_text

N_CHOICES = 4
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE)
FIRST_CHAPTER = re.compile(r"^(?:chapter|Chapter|CHAPTER) (?:1|I|ONE|One)\b", re.MULTILINE)
# a sentence ends at . ! ? (then closing quotes/brackets), before a space and an upper-case start
SENTENCE_BREAK = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z])")
ABBREVIATIONS = frozenset("mr mrs dr st messrs capt col lt gen rev esq mme mlle sr jr vs".split())
WORD = re.compile(r"[A-Za-z]+")
GAP_END = " ,;:.!?"  # a gap is a whole word: a space before it, one of these after it
QUOTES = "\"'\u201c\u2018"


# --------------------------------------------------------------------------------------- text
def book_body(text: str) -> str:
    """The prose of a book: the part between Project Gutenberg's START/END lines (when present),
    from its first "Chapter 1" heading on (when present), with ``_emphasis_`` underscores removed."""
    start, end = GUTENBERG_START.search(text), GUTENBERG_END.search(text)
    body = text[start.end() if start else 0:end.start() if end else len(text)]
    first = FIRST_CHAPTER.search(body)
    if first:
        body = body[first.start():]
    return body.replace("_", "")


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph (a break after . ! ? before an upper-case word; not after an
    abbreviation such as "Mr." or a single initial)."""
    out, start = [], 0
    for m in SENTENCE_BREAK.finditer(paragraph):
        words = paragraph[start:m.start() + 1].split()
        last = words[-1] if words else ""
        stem = last.rstrip(".").lstrip(QUOTES + "(").lower()
        if last.endswith(".") and (stem in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())):
            continue
        out.append(paragraph[start:m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


@dataclass(frozen=True)
class Sentence:
    """One sentence of a book, with its paragraph number."""

    text: str
    paragraph: int
    first: bool  # first sentence of its paragraph

    @property
    def words(self) -> int:
        return len(self.text.split())

    @property
    def dialogue(self) -> bool:
        return self.text[:1] in QUOTES


def book_sentences(text: str) -> list[Sentence]:
    """Every sentence of ``text`` in order (paragraphs as :func:`~tilesparse.data.cloze.normalize_text`)."""
    out = []
    for p, para in enumerate(normalize_text(text).split("\n")):
        out.extend(Sentence(s, p, i == 0) for i, s in enumerate(split_sentences(para)))
    return out


def passage_before(sentences: list[Sentence], i: int, min_words: int, max_words: int) -> int | None:
    """Index of the first sentence of the shortest run ``sentences[j:i]`` with ``min_words`` to
    ``max_words`` words (``None`` when there is none)."""
    words, j = 0, i
    while j > 0 and words < min_words:
        j -= 1
        words += sentences[j].words
    return j if min_words <= words <= max_words else None


def join_passage(sentences: list[Sentence]) -> str:
    """Sentences joined by a space, or by a newline where a paragraph starts."""
    parts = [sentences[0].text]
    for s in sentences[1:]:
        parts.append(("\n" if s.first else " ") + s.text)
    return "".join(parts)


def _item_rng(kind: str, idx: int, seed: int) -> random.Random:
    return random.Random((zlib.crc32(f"{kind}/{idx}".encode()) + seed) & 0xFFFFFFFF)


def _take(candidates: list, make, limit: int | None, seed: int) -> list[dict]:
    """``make(candidate)`` along one seeded permutation of the candidates, skipping ``None``, until
    ``limit`` items (``None``: all of them); so a smaller limit gives a prefix of a larger one."""
    order = list(candidates)
    random.Random(seed).shuffle(order)
    items = []
    for c in order:
        if limit is not None and len(items) >= limit:
            break
        item = make(c)
        if item is not None:
            items.append(item)
    return items


def _shuffled_choices(true: str, distractors: list[str], rng: random.Random) -> tuple[list[str], int]:
    choices = [true, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(true)


# --------------------------------------------------------------------------------------- next sentence
def build_next_sentence(text: str, *, limit: int | None = 200, seed: int = 1234, min_words: int = 25,
                        max_words: int = 100, target_words: tuple[int, int] = (6, 40),
                        length_ratio: float = 1.2, min_distance: int = 200) -> list[dict]:
    """Next-sentence items ``{query, choices, gold, idx}`` from ``text`` (see module docstring).

    The passage is the ``min_words``..``max_words`` words of whole sentences before the true sentence,
    which has ``target_words`` words and does not start a paragraph. Distractors are sentences at least
    ``min_distance`` sentences away, of the same kind (dialogue or narration), with a word count
    within a factor ``length_ratio`` of the true sentence's, all different from each other.
    """
    sents = book_sentences(text)
    by_kind: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (words, index), sorted
    for k, s in enumerate(sents):
        by_kind[s.dialogue].append((s.words, k))
    for pool in by_kind.values():
        pool.sort()
    candidates = []
    for i, s in enumerate(sents):
        if s.first or not target_words[0] <= s.words <= target_words[1]:
            continue
        j = passage_before(sents, i, min_words, max_words)
        if j is not None:
            candidates.append((i, j))

    def make(candidate: tuple[int, int]) -> dict | None:
        i, j = candidate
        true = sents[i]
        pool = by_kind[true.dialogue]
        lo = bisect_left(pool, (true.words / length_ratio, -1))
        hi = bisect_left(pool, (true.words * length_ratio, len(sents)))
        seen = {true.text}
        options = []
        for _, k in pool[lo:hi]:
            if abs(k - i) >= min_distance and sents[k].text not in seen:
                seen.add(sents[k].text)
                options.append(sents[k].text)
        if len(options) < N_CHOICES - 1:
            return None
        rng = _item_rng("next_sentence", i, seed)
        choices, gold = _shuffled_choices(true.text, rng.sample(options, N_CHOICES - 1), rng)
        return {"query": join_passage(sents[j:i]), "choices": choices, "gold": gold, "idx": i}

    return _take(candidates, make, limit, seed)


# --------------------------------------------------------------------------------------- word choice
def content_word_counts(text: str, min_len: int = 4) -> Counter:
    """Counts of the lower-case content words of ``text`` (letters only, ``min_len`` or longer, not a
    stopword); words that also occur capitalised mid-sentence (names) are left out."""
    counts: Counter = Counter()
    capitalised = set()
    for m in WORD.finditer(text):
        w = m.group()
        if w.islower():
            counts[w] += 1
        elif w[0].isupper() and m.start() > 1 and text[m.start() - 2] not in ".!?\"'\n":
            capitalised.add(w.lower())
    return Counter({w: c for w, c in counts.items()
                    if len(w) >= min_len and w not in STOPWORDS and w not in capitalised})


def frequency_neighbours(counts: Counter, ending: int = 2) -> dict[str, list[str]]:
    """Words grouped by their last ``ending`` letters, each group sorted by count (then spelling)."""
    groups: dict[str, list[str]] = {}
    for w in sorted(counts, key=lambda w: (counts[w], w)):
        groups.setdefault(word_ending(w, ending), []).append(w)
    return groups


def word_ending(word: str, ending: int) -> str:
    """The last ``ending`` letters of ``word`` (none when ``ending`` is 0)."""
    return word[-ending:] if ending > 0 else ""


def similar_frequency_words(word: str, group: list[str], *, window: int = 12,
                            exclude: set[str] = frozenset()) -> list[str]:
    """The words next to ``word`` in ``group`` (words sorted by count, ``word`` among them), up to
    ``window`` on each side, without ``exclude`` and words that share their first four letters with
    ``word`` (inflections of it)."""
    r = group.index(word)
    near = group[max(0, r - window):r] + group[r + 1:r + 1 + window]
    return [w for w in near if w not in exclude and w[:4] != word[:4]]


def build_word_choice(text: str, *, limit: int | None = 200, seed: int = 1234, min_words: int = 25,
                      max_words: int = 100, min_after: int = 3, min_count: int = 5,
                      window: int = 12, ending: int = 2) -> list[dict]:
    """Word-choice items ``{query, choices, gold, idx}`` from ``text`` (see module docstring).

    One gap per sentence: a lower-case content word (seen ``min_count`` times in the book) with at least
    ``min_after`` words after it in its sentence; the query is ``min_words``..``max_words`` words of
    text ending just before it (whole sentences before, then the start of its sentence). The
    distractors are drawn from the ``window`` words on either side of the true word in the frequency
    ranking of the eligible words that share its last ``ending`` letters, leaving out words of the
    sentence and inflections of the true word.
    """
    sents = book_sentences(text)
    counts = content_word_counts("\n".join(s.text for s in sents))
    eligible = {w for w, c in counts.items() if c >= min_count}
    groups = frequency_neighbours(Counter({w: counts[w] for w in eligible}), ending)

    def gaps_of(s: Sentence) -> list[re.Match]:
        tokens = list(WORD.finditer(s.text))
        return [m for m in tokens[1:len(tokens) - min_after]
                if m.group() in eligible and s.text[m.start() - 1] == " " and s.text[m.end()] in GAP_END]

    def make(i: int) -> dict | None:
        s = sents[i]
        rng = _item_rng("word_choice", i, seed)
        gap = rng.choice(gaps_of(s))
        head, word, rest = s.text[:gap.start()].rstrip(), gap.group(), s.text[gap.end():]
        j = passage_before(sents, i, max(0, min_words - len(head.split())), max_words - len(head.split()))
        if j is None:
            return None
        options = similar_frequency_words(word, groups[word_ending(word, ending)], window=window,
                                          exclude={t.group().lower() for t in WORD.finditer(s.text)})
        if len(options) < N_CHOICES - 1:
            return None
        words, gold = _shuffled_choices(word, rng.sample(options, N_CHOICES - 1), rng)
        query = join_passage(sents[j:i] + [Sentence(head, s.paragraph, s.first)])
        return {"query": query, "choices": [w + rest for w in words], "gold": gold, "idx": i}

    return _take([i for i, s in enumerate(sents) if gaps_of(s)], make, limit, seed)
