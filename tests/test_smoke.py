"""End-to-end smoke test: prune a tiny LLaMA with each method, evaluate and inspect it."""

import json

import pytest

import sparseheal


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_evaluate_inspect(llama_dir, tmp_path, method):
    out = sparseheal.prune(str(llama_dir), str(tmp_path / "p"), method=method, nsamples=4, seqlen=32,
                           calibration_batch_size=2)
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["sparsity_achieved"] == pytest.approx(0.5, abs=1e-3)
    report = sparseheal.inspect(str(out))
    assert report["ok"] and report["mask_violations"] == 0
    res = sparseheal.evaluate(str(out), seqlen=32, max_windows=4)["results"][0]
    assert res["windows"] == 4 and res["ppl"] > 1
