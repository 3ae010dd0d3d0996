"""Training text that represents the model, not a book: token sequences sampled from the dense model itself.

``self:N`` as a training source means N tokens drawn from the model with nucleus sampling. Half of the
sequences start from nothing but BOS (or the end-of-text token when the tokenizer has no BOS): the
model's own unconditional distribution. The other half start from one of :data:`SEED_PROMPTS`, short
openings across many domains, wrapped in the chat template when the tokenizer has one (a chat model's
usual input), so that instruction-tuned models are sampled in the mode they are used in. Prompt tokens
are not part of the corpus. Sequences that repeat themselves (fewer than a third distinct tokens) or
duplicate an earlier one are dropped and drawn again.

The corpus is cached under the cache folder, keyed by the model's weight fingerprint and every sampling
setting, so the cost is paid once per model and setting.
"""

from __future__ import annotations

import hashlib
import json
import re

import torch

from ..errors import TilesparseError
from ..paths import cache_dir

SELF_PREFIX = "self:"
SEED_PROMPTS = (
    "The history of", "In this recipe, you will", "Dear Sir,", "The results of the experiment show",
    "def main():", "Breaking news:", "Once upon a time", "The main causes of the", "How to install",
    "In mathematics, a", "The patient presented with", "Q: What is the difference between", "Chapter 1",
    "The city council voted", "Photosynthesis is", "Here is a summary of the meeting:", "The best way to learn",
    "According to the report,", "Abstract. We propose", "The following table lists", "I remember when",
    "Step 1:", "The court ruled that", "In the beginning", "Product description:", "The weather today",
    "Theorem 1.", "My favourite", "To whom it may concern,", "The stock market", "Introduction\n\n",
    "Frequently asked questions",
)
_SAMPLING_VERSION = 1  # part of the cache key: bump when the sampling procedure changes


def parse_self_source(source: str) -> int | None:
    """``"self:20000"`` / ``"self:20k"`` / ``"self:1M"`` -> the token count; ``None`` for other sources."""
    if not isinstance(source, str) or not source.startswith(SELF_PREFIX):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", source[len(SELF_PREFIX):].strip())
    if not m:
        raise TilesparseError(f"{source!r}: expected self:N with N a token count such as 20000, 20k or 1M")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]
    if n < 1:
        raise TilesparseError(f"{source!r}: self:N needs a positive token count N")
    return int(n)


def _starts(tokenizer, count: int, rng: torch.Generator) -> list[list[int]]:
    """``count`` prompt token lists: alternately BOS only and a seed prompt (chat-wrapped when possible)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise TilesparseError("self-sampling needs a tokenizer with a BOS or end-of-text token")
    chat = getattr(tokenizer, "chat_template", None) is not None
    out = []
    for i in range(count):
        if i % 2 == 0:
            out.append([bos])
            continue
        prompt = SEED_PROMPTS[int(torch.randint(len(SEED_PROMPTS), (1,), generator=rng))]
        if chat and i % 4 == 1:
            text = tokenizer.apply_chat_template([{"role": "user", "content": f"Continue this text: {prompt}"}],
                                                 add_generation_prompt=True, tokenize=False)
            out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            out.append([bos] + tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return out


def _usable(seq: list[int], seen: set) -> bool:
    if len(seq) < 8 or len(set(seq)) < len(seq) / 3:
        return False
    key = tuple(seq[:32])
    if key in seen:
        return False
    seen.add(key)
    return True


@torch.no_grad()
def sample_tokens(model, tokenizer, tokens: int, *, seqlen: int = 256, batch: int = 16, seed: int = 0,
                  temperature: float = 1.0, top_p: float = 0.95, progress: bool = True) -> torch.Tensor:
    """Draw about ``tokens`` tokens from ``model`` (see the module docstring) as a 1-D int64 stream;
    sequences are separated by the end-of-text token."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessor, LogitsProcessorList

    class _TokenizerVocab(LogitsProcessor):  # embedding rows past the tokenizer (padding) are never drawn
        def __call__(self, input_ids, scores):
            scores[:, len(tokenizer):] = -float("inf")
            return scores

    if temperature <= 0 or not 0 < top_p <= 1:
        raise TilesparseError(f"sampling needs temperature > 0 and top_p in (0, 1], got {temperature}, {top_p}")
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    # left padding is masked out, so any id serves
    pad = next(t for t in (tokenizer.pad_token_id, eos, tokenizer.bos_token_id, 0) if t is not None)
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    stream: list[int] = []
    seen: set = set()
    bar = tqdm(total=tokens, desc="sampling from the model", unit="tok", disable=not progress, dynamic_ncols=True)
    rounds = 0
    while len(stream) < tokens:
        rounds += 1
        if rounds > 4 * (tokens // max(1, seqlen * batch) + 2):
            raise TilesparseError("self-sampling keeps producing repetitive text; try a higher temperature")
        starts = _starts(tokenizer, batch, rng)
        width = max(len(s) for s in starts)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, s in enumerate(starts):  # left padding: every prompt ends at the same position
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=seqlen,
                             min_new_tokens=seqlen, pad_token_id=pad, eos_token_id=None,
                             logits_processor=LogitsProcessorList([_TokenizerVocab()]))
        before = len(stream)
        for row in out[:, width:].tolist():
            if _usable(row, seen) and len(stream) < tokens:
                stream.extend(row)
                if eos is not None:
                    stream.append(eos)
        bar.update(min(tokens, len(stream)) - min(tokens, before))
    bar.close()
    return torch.tensor(stream[:tokens], dtype=torch.long)


def self_corpus(loaded, tokens: int, *, seed: int = 0, seqlen: int = 256, batch: int | None = None,
                temperature: float = 1.0, top_p: float = 0.95, progress: bool = True) -> torch.Tensor:
    """:func:`sample_tokens` from a :class:`~tilesparse.models.LoadedModel`, cached by the model's weight
    fingerprint and the sampling settings (written atomically). ``batch``: sequences drawn at once
    (default 128 on a GPU, 16 on a CPU). A cached corpus that differs only in ``batch`` (drawn on another
    device, say on a GPU for a CPU run) is used when the exact one is missing: it is a sample of the same
    model with the same settings, only another draw."""
    from ..atomic import atomic_torch_save
    from ..models.loading import weights_fingerprint

    if batch is None:
        batch = 128 if next(loaded.model.parameters()).is_cuda else 16
    settings = {"tokens": tokens, "seed": seed, "seqlen": seqlen, "batch": batch, "temperature": temperature,
                "top_p": top_p, "version": _SAMPLING_VERSION, "model": weights_fingerprint(loaded.model),
                "vocab": len(loaded.tokenizer)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "self-samples" / f"{key}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        if data.get("settings") == settings:
            return data["ids"]
    for other in sorted(path.parent.glob("*.pt")):  # the same corpus drawn with another batch size
        data = torch.load(other, weights_only=True)
        if {**data.get("settings", {}), "batch": batch} == settings:
            return data["ids"]
    ids = sample_tokens(loaded.model, loaded.tokenizer, tokens, seqlen=seqlen, batch=batch, seed=seed,
                        temperature=temperature, top_p=top_p, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"settings": settings, "ids": ids}, path)
    return ids


__all__ = ["SELF_PREFIX", "SEED_PROMPTS", "parse_self_source", "sample_tokens", "self_corpus"]
