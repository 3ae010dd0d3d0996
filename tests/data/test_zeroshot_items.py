"""Offline zero-shot items from a text: next sentence and word choice (and the text helpers)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import SYNTHETIC_WORDS, make_synthetic_book

from tilesparse.data.cloze import STOPWORDS, build_cloze, normalize_text
from tilesparse.data.zeroshot_items import (N_CHOICES, book_body, book_sentences, build_next_sentence,
                                            build_word_choice, content_word_counts, frequency_neighbours,
                                            similar_frequency_words, split_sentences)

BOOK = make_synthetic_book()
SMALL = {"min_distance": 50}  # the synthetic book has about 750 sentences
VOCABULARY = {w for group in SYNTHETIC_WORDS.values() for w in group.split()}


# ------------------------------------------------------------------------------------- text helpers
def test_book_body_strips_the_gutenberg_frame_and_front_matter():
    text = ("The Project Gutenberg EBook of X\n\nLicense text.\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\n"
            "X\n\nETYMOLOGY.\n\nSome front matter.\n\nCHAPTER 1. Loomings.\n\nCall me _Ishmael_. Some years ago.\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n\nMore license text.\n")
    body = book_body(text)
    assert body.startswith("CHAPTER 1. Loomings.") and "Call me Ishmael. Some years ago." in body
    assert "License" not in body and "front matter" not in body and "***" not in body
    plain = "Persuasion\n\nby\n\nJane Austen\n\nChapter 1\n\nSir Walter Elliot, of Kellynch Hall."
    assert book_body(plain) == plain[plain.index("Chapter 1"):]
    assert book_body("No chapters here.") == "No chapters here."


def test_split_sentences():
    para = ('"My dear Mr. Bennet," said his lady, "have you heard?" Mr. Bennet replied that he had not. '
            'Hold! cried the man. It was J. Smith who came! "Indeed," said she. Then nothing')
    assert split_sentences(para) == [
        '"My dear Mr. Bennet," said his lady, "have you heard?"', "Mr. Bennet replied that he had not.",
        "Hold! cried the man.", "It was J. Smith who came!", '"Indeed," said she.', "Then nothing"]


def test_book_sentences_keep_paragraphs_and_drop_headings():
    sents = book_sentences(BOOK)
    assert sents[0].first and not sents[1].first and sents[0].paragraph == 0
    assert all(not s.text.startswith("Chapter") for s in sents)
    assert any(s.dialogue for s in sents) and not all(s.dialogue for s in sents)
    assert " ".join(s.text for s in sents if s.paragraph == 0) == normalize_text(BOOK).split("\n")[0]


def test_similar_frequency_words():
    counts = Counter({"walked": 9, "talked": 8, "smiled": 7, "wished": 3, "hoped": 2, "walking": 5, "slowly": 4})
    groups = frequency_neighbours(counts)
    assert groups["ed"] == ["hoped", "wished", "smiled", "talked", "walked"]  # by count
    assert groups["ng"] == ["walking"]
    assert similar_frequency_words("smiled", groups["ed"], window=1) == ["wished", "talked"]
    assert similar_frequency_words("talked", groups["ed"], window=2, exclude={"walked"}) == ["wished", "smiled"]
    assert similar_frequency_words("walked", frequency_neighbours(Counter({"walked": 2, "walks": 1}), 0)[""]) == []
    # lower-case content words only; "letter" and "anne" also appear capitalised mid-sentence (names)
    wc = content_word_counts("Anne walked. The letter walked; Anne said the Letter was here. anne")
    assert wc == Counter({"walked": 2})


# ------------------------------------------------------------------------------------- next sentence
def test_next_sentence_items_are_well_formed():
    norm = normalize_text(BOOK)
    sents = book_sentences(BOOK)
    items = build_next_sentence(BOOK, limit=None, **SMALL)
    assert len(items) > 100
    for it in items:
        assert len(it["choices"]) == N_CHOICES == len(set(it["choices"]))
        true = it["choices"][it["gold"]]
        assert sents[it["idx"]].text == true
        assert it["query"] + " " + true in norm  # the true sentence follows the passage
        assert 25 <= len(it["query"].split()) <= 100
        for c in it["choices"]:
            k = next(k for k, s in enumerate(sents) if s.text == c)
            assert sents[k].dialogue == sents[it["idx"]].dialogue
            assert 1 / 1.2 <= len(c.split()) / len(true.split()) <= 1.2
            if c != true:
                assert any(abs(k2 - it["idx"]) >= 50 for k2, s in enumerate(sents) if s.text == c)
    assert {it["gold"] for it in items} == set(range(N_CHOICES))


def test_next_sentence_is_deterministic_and_nested():
    five = build_next_sentence(BOOK, limit=5, **SMALL)
    assert len(five) == 5 and five == build_next_sentence(BOOK, limit=5, **SMALL)
    assert build_next_sentence(BOOK, limit=12, **SMALL)[:5] == five
    assert build_next_sentence(BOOK, limit=None, **SMALL)[:5] == five
    assert build_next_sentence(BOOK, limit=5, seed=7, **SMALL) != five
    assert build_next_sentence(BOOK, limit=5, min_distance=10_000) == []  # no distractor far enough


# ------------------------------------------------------------------------------------- word choice
def test_word_choice_items_are_well_formed():
    norm = normalize_text(BOOK)
    counts = Counter(re.findall(r"[a-z]+", norm))
    items = build_word_choice(BOOK, limit=None)
    assert len(items) > 100
    for it in items:
        words = [re.match(r"[a-z]+", c).group() for c in it["choices"]]
        rests = {c[len(w):] for c, w in zip(it["choices"], words)}
        assert len(words) == N_CHOICES == len(set(words)) and len(rests) == 1  # only the word differs
        true = words[it["gold"]]
        assert it["query"] + " " + it["choices"][it["gold"]] in norm  # the gap is filled back
        assert 25 <= len(it["query"].split()) <= 100 and true not in STOPWORDS and len(true) >= 4
        assert len(rests.pop().split()) >= 3
        for w in words:
            assert w[-2:] == true[-2:] and counts[w] >= 5  # same ending, a frequent word of the book
            assert w in VOCABULARY


def test_word_choice_is_deterministic_and_nested():
    five = build_word_choice(BOOK, limit=5)
    assert len(five) == 5 and five == build_word_choice(BOOK, limit=5)
    assert build_word_choice(BOOK, limit=20)[:5] == five
    assert build_word_choice(BOOK, limit=5, seed=3) != five


# ------------------------------------------------------------------------------------- real texts
@pytest.mark.slow
def test_items_from_the_evaluation_texts_never_come_from_training_texts():
    """The embedded evaluation texts give full tasks whose passages do not occur in the training texts."""
    from tilesparse.data.embedded import TRAIN_TEXTS, embedded_text

    train = " ".join(normalize_text(book_body(embedded_text(t))).replace("\n", " ") for t in TRAIN_TEXTS)
    for name in ("persuasion", "prideprejudice", "mobydick"):
        text = book_body(embedded_text(name))
        for items in (build_next_sentence(text, limit=40), build_word_choice(text, limit=40)):
            assert len(items) == 40
            assert not any(it["query"].replace("\n", " ")[-80:] in train for it in items)
        cloze = build_cloze(text, limit=40)
        assert len(cloze) == 40 and not any(it["context"].replace("\n", " ")[-80:] in train for it in cloze)
