"""Shared fixtures: tiny randomly initialised models of four architecture families."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without a GPU the Triton kernels run through Triton's interpreter; the variable must be set before the
# first import of triton (transformers imports it), so it is set here, before any test module loads
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ARCHES = ("llama", "qwen2", "gemma3", "gpt2", "opt")


def make_tiny_model(arch: str = "llama", *, seed: int = 0, layers: int = 2):
    """A tiny random causal LM of the given family (hidden 64, vocab 128), in eval mode, fp32."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=128)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=256, sliding_window=64, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=256, bos_token_id=0,
                            eos_token_id=0, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, **common)
        model = tf.OPTForCausalLM(cfg)
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.eval()


@pytest.fixture(params=ARCHES)
def tiny_any(request):
    """One tiny model per architecture family."""
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


def make_byte_tokenizer():
    """A byte-level fast tokenizer (256 ids, ``!`` as BOS and EOS) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="!", eos_token="!")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty tilesparse cache dir for the test."""
    monkeypatch.setenv("TILESPARSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline, < 128 ids) that needs no download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<s>", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny LLaMA folder (model + character tokenizer) usable as ``--model``."""
    model = make_tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A plain text file with enough characters for a few 64-token windows."""
    p = tmp_path / "text.txt"
    p.write_text(("It is a truth universally acknowledged, that a single man in possession "
                  "of a good fortune, must be in want of a wife.\n") * 20, encoding="utf-8")
    return p


SYNTHETIC_WORDS = {  # content words in groups that share their last two letters
    "ed": "walked talked smiled wished hoped looked called turned seemed wanted",
    "ly": "quickly slowly gently kindly warmly softly rarely nearly",
    "er": "letter father sister dinner weather manner corner river",
    "ng": "morning evening feeling meeting wedding building",
}


def make_synthetic_book(paragraphs: int = 150, seed: int = 0) -> str:
    """A deterministic plain-text "book": chapters of paragraphs of narration and dialogue sentences
    of varied length, built from a small vocabulary (fast stand-in for an embedded text)."""
    import random

    rng = random.Random(seed)
    words = {k: v.split() for k, v in SYNTHETIC_WORDS.items()}
    names = ["Anne", "Mary", "Charles", "Frederick"]

    def clause() -> str:
        return (f"the {rng.choice(words['er'])} {rng.choice(words['ed'])} {rng.choice(words['ly'])} "
                f"after the {rng.choice(words['ng'])}")

    def sentence() -> str:
        body = " and ".join(clause() for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.2:
            return f'"{body[0].upper()}{body[1:]}," said {rng.choice(names)}.'
        return f"{rng.choice(names)} saw that {body}."

    chapters = []
    for c in range(paragraphs // 30 + 1):
        paras = [" ".join(sentence() for _ in range(rng.randint(3, 7))) for _ in range(min(30, paragraphs - 30 * c))]
        chapters.append(f"Chapter {c + 1}\n\n" + "\n\n".join(paras))
    return "\n\n\n".join(chapters) + "\n"


def pytest_collection_modifyitems(config, items):
    """``slow`` tests use the real default model. ``heavy`` ones (minutes each) run only when
    ``TILESPARSE_SLOW=all``; ``TILESPARSE_SLOW=none`` skips every slow test (default: ``ci``, the
    slow but not heavy ones)."""
    mode = os.environ.get("TILESPARSE_SLOW", "ci")
    for item in items:
        if "slow" not in item.keywords:
            continue
        if mode == "none" or ("heavy" in item.keywords and mode != "all"):
            item.add_marker(pytest.mark.skip(reason=f"slow test skipped (TILESPARSE_SLOW={mode}; 'all' runs it)"))
