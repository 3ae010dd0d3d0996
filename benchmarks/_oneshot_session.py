"""What a one-shot pruning benchmark keeps across its rows: the model and its original weights, the calibration
segments, the evaluation texts and a cache of the rows done so far (an interrupted run resumes)."""

from __future__ import annotations

import json
from pathlib import Path

from oneshot import machine

from tilesparse.commands.common import quiet_libraries
from tilesparse.evaluation import evaluate_text
from tilesparse.models import find_prunable_linears, load_model
from tilesparse.pruning import calibration_ids


class OneShotSession:
    """``args`` come from :func:`_args.add_model_and_calibration`; ``cache`` is the JSON file of finished rows;
    ``write_table(args, cache, texts, calib_desc, model_name)`` rewrites the script's table from them."""

    def __init__(self, args, cache: str, write_table):
        quiet_libraries()
        self.args = args
        self.write_table = write_table
        self.texts = [t for t in args.eval_texts.split(",") if t]
        self.cache_path = Path(cache)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self.loaded = load_model(args.model)
        self.layers = find_prunable_linears(self.loaded.model)
        self.originals = {l.name: l.weight.detach().clone() for l in self.layers}
        self.calib, self.calib_desc = calibration_ids(self.loaded, args.calib_text, args.calib_samples, args.seqlen)
        self.cache["_machine"] = machine()

    def evaluate(self) -> dict:
        """Perplexity of the model as it is now on every evaluation text (an optional text this machine lacks is
        said and skipped)."""
        out = {}
        for t in self.texts:
            try:
                out[t] = evaluate_text(self.loaded, t, seqlen=self.args.seqlen, max_windows=self.args.windows,
                                       progress=False).perplexity
            except Exception as e:  # noqa: BLE001 (an optional text that this machine lacks: said, skipped)
                print(f"  {t}: skipped ({e})", flush=True)
        return out

    def restore(self) -> None:
        """Put the original weights back (after a row that changed them)."""
        for l in self.layers:
            l.set_weight(self.originals[l.name])

    def save(self) -> None:
        """Write the rows done so far, and the table from them."""
        self.cache_path.write_text(json.dumps(self.cache, indent=1))
        self.write_table(self.args, self.cache, self.texts, self.calib_desc, self.loaded.name)

    def evaluate_dense(self) -> None:
        """The dense model's row, once (kept in the cache)."""
        if "dense" not in self.cache:
            self.cache["dense"] = {"ppl": self.evaluate()}
            self.save()
