"""LoRA healing end to end on a tiny LLaMA: artifacts, record, untouched base, learning, bad input."""

from __future__ import annotations

import json

import pytest

import sparseheal
from sparseheal.cli import main
from sparseheal.config import ConfigError
from sparseheal.models import hash_weights

FAST = dict(max_steps=4, block_size=32, max_eval_samples=2, logging_steps=1, device="cpu")


@pytest.fixture(scope="module")
def pruned(llama_dir, tmp_path_factory):
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("p") / "pruned"), method="magnitude")


@pytest.fixture(scope="module")
def other_pruned(llama_dir, tmp_path_factory):
    return sparseheal.prune(str(llama_dir), str(tmp_path_factory.mktemp("q") / "pruned"), method="magnitude",
                            sparsity=0.6)


@pytest.fixture(scope="module")
def learnable_pruned(tmp_path_factory):
    """A pruned tiny LLaMA whose (frozen, tied) embeddings are scaled x5, so that adapters on the linears
    can move the logits far enough to fit text (at the default 0.02 init the logits stay within about +-1)."""
    import torch
    from conftest import make_model_dir
    from transformers import AutoModelForCausalLM

    base = make_model_dir(tmp_path_factory.mktemp("loud") / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(5.0)
    model.save_pretrained(base)
    return sparseheal.prune(str(base), str(base.parent / "pruned"), method="magnitude")


@pytest.fixture(scope="module")
def repetitive(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "repeat.txt"
    path.write_text("the sparse model heals while every pruned weight stays exactly zero. " * 120)
    return path


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_heal_writes_adapter_and_record_and_leaves_base_untouched(pruned, tmp_path):
    before = _files(pruned)
    out = sparseheal.heal(str(pruned), str(tmp_path / "out"), **FAST)
    assert _files(pruned) == before  # every file of the base, bit for bit
    assert {"adapter_config.json", "adapter_model.safetensors", "sparseheal.json", "train_log.jsonl"} <= {
        p.name for p in out.iterdir()}
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["base_hash"] == hash_weights(pruned)
    assert record["base_path"] == str(pruned.resolve())
    assert record["method"] == "lora" and record["recipe"]["rank"] == 8 and record["recipe"]["lr"] == 1e-4
    # the recipe keeps what was asked (the default), the adapter what it settled to for this model
    assert record["recipe"]["targets"] is None and record["adapter"]["targets"] == "q_proj,v_proj"
    assert record["recipe"]["dropout"] == 0.05
    assert record["tokens_seen"] == 4 * 32 and record["steps"] == 4
    assert record["trainable_parameters"] == 2 * 2 * 8 * (64 + 64) - 2 * 8 * 32  # q: 64->64, v: 64->32 (GQA)
    assert record["peak_rss_mb"] > 0 and record["wall_seconds"] > 0
    assert record["final_loss"] > 0 and record["eval_loss"] > 0
    assert record["adapter"]["modules"] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                                            for m in ("q_proj", "v_proj")]
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)] == [1, 2, 3, 4]
    assert not (tmp_path / "out.ckpt").exists()  # checkpoints removed without --save-steps


def test_training_loss_goes_down_on_repetitive_text(learnable_pruned, repetitive, tmp_path):
    out = sparseheal.heal(str(learnable_pruned), str(tmp_path / "out"), data=str(repetitive), max_steps=30,
                          block_size=32, max_eval_samples=2, lr=1e-2, targets="all-linear", dropout=0.0,
                          logging_steps=5, device="cpu")
    entries = map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
    losses = [e["loss"] for e in entries if "loss" in e]
    assert losses[-1] < 0.75 * losses[0] and losses[-1] < losses[1], losses
    record = json.loads((out / "sparseheal.json").read_text())
    assert any(".mlp." in name for name in record["adapter"]["modules"])  # all-linear reaches the MLP


def test_evaluate_with_adapter_checks_the_base(pruned, other_pruned, repetitive, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "out"), data=str(repetitive), max_steps=10, lr=1e-2,
                          block_size=32, max_eval_samples=2, device="cpu")
    plain = sparseheal.evaluate(str(pruned), seqlen=32, max_windows=4, device="cpu")["results"][0]["ppl"]
    adapted = sparseheal.evaluate(str(pruned), adapter=str(out), seqlen=32, max_windows=4,
                                  device="cpu")["results"][0]["ppl"]
    assert adapted != pytest.approx(plain, rel=1e-6)
    with pytest.raises(ConfigError) as err:
        sparseheal.evaluate(str(other_pruned), adapter=str(out), seqlen=32, max_windows=4, device="cpu")
    assert hash_weights(pruned) in str(err.value) and hash_weights(other_pruned) in str(err.value)


def _cli_refuses(argv, capsys, flag, *needles):
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sparseheal: error: {flag}"), err
    for needle in needles:
        assert needle in err[0]


def test_bad_input_is_refused_and_nothing_is_written(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["-o", str(out), "--max-steps", "2", "--block-size", "32", "--device", "cpu"]
    _cli_refuses(["heal", str(tmp_path), *common], capsys, "PRUNED_DIR", "not a model directory")
    _cli_refuses(["heal", str(pruned), *common, "--targets", "q_proj,qkv"], capsys, "--targets",
                 "'qkv'", "q_proj", "gate_proj", "down_proj")
    _cli_refuses(["heal", str(pruned), *common, "--rank", "0"], capsys, "--rank")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    _cli_refuses(["heal", str(pruned), *common, "--data", str(tiny)], capsys, "--data",
                 "fewer than one block")
    _cli_refuses(["heal", str(pruned), *common, "--resume"], capsys, "--resume", "no checkpoint")
    _cli_refuses(["heal", str(pruned), *common, "--merge", "sparse"], capsys, "--merge", "masked")
    _cli_refuses(["heal", str(pruned), *common, "--scheduler", "sawtooth"], capsys, "--scheduler", "cosine")
    _cli_refuses(["heal", str(pruned), *common, "--method", "full", "--merge", "masked"], capsys, "--merge",
                 "lora only")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.txt"]


def test_mismatched_adapter_is_refused_by_merge(pruned, other_pruned, tmp_path, capsys):
    adapter = sparseheal.heal(str(pruned), str(tmp_path / "a"), **FAST)
    _cli_refuses(["merge", str(adapter), "-o", str(tmp_path / "m"), "--base", str(other_pruned)], capsys,
                 "--base", hash_weights(pruned), hash_weights(other_pruned))
    _cli_refuses(["merge", str(pruned), "-o", str(tmp_path / "m")], capsys, "ADAPTER_DIR",
                 "not a PEFT adapter")
    assert not (tmp_path / "m").exists()


def test_cli_heal_with_masked_merge(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    main_args = ["heal", str(pruned), "-o", str(out), "--max-steps", "3", "--block-size", "32",
                 "--device", "cpu", "--max-eval-samples", "2", "--merge", "masked", "--mask-aware",
                 "--lr", "1e-2"]
    with pytest.raises(SystemExit) as exit_info:
        main(main_args)
    assert exit_info.value.code == 0
    assert "healed" in capsys.readouterr().out
    record = json.loads((out / "sparseheal.json").read_text())
    merged = record["merged"]
    assert merged["mode"] == "masked" and merged["sparsity_after"] == merged["sparsity_before"] == 0.5
    assert merged["eval"]["ppl_merged"] == pytest.approx(merged["eval"]["ppl_unmerged"], rel=1e-4)
    report = sparseheal.inspect(str(out / "merged"))
    assert report["ok"] and report["mask_violations"] == 0
