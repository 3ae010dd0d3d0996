"""A LAMBADA-style last-word cloze task built from a plain text (by default Persuasion).

Each item is a passage that ends just before the last word of a sentence (``context``) and that word
(``target``, with its leading space, e.g. ``" Anne"``). Like LAMBADA, only words that already occur
in the passage are used (a model that follows the passage can predict them), and no function words; the passage starts at a
sentence boundary and has ``min_words``..``max_words`` words. The selection is a seeded random subset.
"""

from __future__ import annotations

import random
import re

WORD_AT_SENTENCE_END = re.compile(r"^([A-Za-z]{3,})[.!?]")
SENTENCE_END = re.compile(r"[.!?][\"')]*$")
HEADING = re.compile(r"^(chapter|volume|book)\b", re.IGNORECASE)
# function words (pronouns, auxiliaries, particles) are too easy or too arbitrary as targets
STOPWORDS = frozenset("""
all and any are but can could did does done for had has have her hers herself him himself his how
its itself may might mine more most much must nor not now one ours ourselves out own said say says
she should some such than that the their theirs them themselves then there these they this those
too very was were what when where which who whom why will with would yes you your yours yourself
again also ever else here once only still yet about above after before down from into over under
upon well so off
""".split())


def normalize_text(text: str) -> str:
    """Paragraphs (blank-line separated) with inner whitespace collapsed, one per line; headings dropped."""
    paras = []
    for para in re.split(r"\n\s*\n", text.replace("\r", "")):
        para = " ".join(para.split())
        if para and not HEADING.match(para) and len(para.split()) > 3:
            paras.append(para)
    return "\n".join(paras)


def build_cloze(text: str, *, limit: int | None = 200, seed: int = 1234, min_words: int = 40,
                max_words: int = 120, require_in_context: bool = True) -> list[dict]:
    """Cloze items ``{context, target, idx}`` from ``text`` (see module docstring).

    ``limit`` caps the number of items (``None``: every candidate); the items are a prefix of one seeded
    permutation of all candidates, so a smaller limit selects a subset of a larger one.
    """
    norm = normalize_text(text)
    toks = [(m.start(), m.group()) for m in re.finditer(r"\S+", norm)]
    starts = [1 if i == 0 else int(bool(SENTENCE_END.search(toks[i - 1][1])) or norm[toks[i][0] - 1] == "\n")
              for i in range(len(toks))]
    items = []
    for i, (pos, tok) in enumerate(toks):
        m = WORD_AT_SENTENCE_END.match(tok)
        if m is None or i < min_words or norm[pos - 1] != " ":
            continue
        # earliest sentence start leaving min..max words of context (none: skip the candidate)
        lo, hi = max(0, i - max_words), i - min_words
        j = next((k for k in range(lo, hi + 1) if starts[k]), None)
        if j is None:
            continue
        context = norm[toks[j][0]:pos].rstrip()
        word = m.group(1)
        if word.lower() in STOPWORDS:
            continue
        if require_in_context and not re.search(rf"\b{word}\b", context):
            continue
        items.append({"context": context, "target": " " + word, "idx": len(items)})
    random.Random(seed).shuffle(items)
    return items if limit is None else items[:limit]
