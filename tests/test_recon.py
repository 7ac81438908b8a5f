"""Reconstruction units for block-wise healing: how layers split, what a unit receives, the input modes,
early stopping on the held-out slice, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from architectures import make_arch_dir
from safetensors.torch import load_file
from test_auto import _pruned_weights_are_zero
from test_cli import _run
from torch import nn

import sparseheal
from sparseheal.heal.recon import layer_units, tap_units
from sparseheal.models import decoder_layers, load_model
from sparseheal.sparsity.capture import at_layer, capture_layer_inputs

BLOCK = dict(method="blockwise", epochs=2, lr=1e-3, device="cpu")


@pytest.fixture(scope="module")
def pruned(llama_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("recon") / "pruned"
    return sparseheal.prune(str(llama_dir), str(out), method="wanda", sparsity=0.6, nsamples=4, seqlen=32,
                            data_dir=str(data_dir))


@pytest.fixture(scope="module")
def moe_pruned(data_dir, tmp_path_factory):
    src = make_arch_dir(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe")
    out = tmp_path_factory.mktemp("recon_moe") / "pruned"
    return sparseheal.prune(str(src), str(out), method="wanda", sparsity=0.5, nsamples=2, seqlen=32,
                            device="cpu", data_dir=str(data_dir))


def test_units_of_a_dense_and_an_moe_layer(pruned, moe_pruned):
    _, layers = decoder_layers(load_model(str(pruned), device="cpu")[0])
    assert layer_units(layers[0], "layer") == [""]
    assert layer_units(layers[0], "submodule") == ["self_attn", "mlp"]
    _, moe_layers = decoder_layers(load_model(str(moe_pruned), device="cpu")[0])
    assert layer_units(moe_layers[0], "submodule") == ["self_attn", "mlp.experts", "mlp.shared_expert"]


class _Bare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(8, 8))
        self.fc = nn.Linear(8, 8)


def test_a_layer_without_separable_submodules_is_refused():
    with pytest.raises(ValueError, match="holds fc"):
        layer_units(_Bare(), "submodule")
    with pytest.raises(ValueError, match="one submodule"):
        layer_units(nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))), "submodule")


def test_a_tapped_call_replays_to_its_output_and_stop_skips_the_rest(pruned):
    model, tokenizer, _ = load_model(str(pruned), device="cpu")
    _, layers = decoder_layers(model)
    tokens = torch.randint(0, 100, (2, 16))
    stream = at_layer(capture_layer_inputs(model, layers, tokens, 1, torch.device("cpu")), 0)
    calls = tap_units(layers[0], ["self_attn", "mlp"], stream, torch.device("cpu"))
    assert list(calls) == ["self_attn", "mlp"] and len(calls["mlp"]) == 2
    with torch.no_grad():
        again = layers[0].mlp(*calls["mlp"][1].args, **calls["mlp"][1].kwargs)
    assert torch.equal(again, calls["mlp"][1].output)
    ran = []
    handle = layers[0].mlp.register_forward_hook(lambda *_: ran.append(1))
    tap_units(layers[0], ["self_attn"], stream, torch.device("cpu"), stop=True)
    handle.remove()
    assert ran == []  # the forward ended at the attention


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_dense_inputs_agree_with_sparse_at_the_first_layer_only(pruned, tmp_path):
    """Layer 0's inputs are the embeddings in both streams; later layers see different inputs."""
    sparse = _weights(sparseheal.heal(str(pruned), str(tmp_path / "s"), **BLOCK))
    dense = _weights(sparseheal.heal(str(pruned), str(tmp_path / "d"), **BLOCK, recon_inputs="dense"))
    assert all(torch.equal(sparse[k], dense[k]) for k in sparse if ".layers.0." in k)
    assert any(not torch.equal(sparse[k], dense[k]) for k in sparse if ".layers.1." in k)


def test_submodules_train_each_unit_and_keep_the_mask(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **BLOCK, granularity="submodule")
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["blockwise"]["granularity"] == "submodule" and record["mask_verification"]["ok"]
    for layer in record["blockwise"]["layers"]:
        assert [u["unit"] for u in layer["units"]] == ["self_attn", "mlp"]
        assert layer["loss_after"] < layer["loss_before"]
        assert all(u["train_loss_last_epoch"] < u["train_loss_first_epoch"] for u in layer["units"])
    before, after = _weights(pruned), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("self_attn" in k for k in changed) and any("mlp" in k for k in changed)
    # each unit trains with the norm that feeds it; the final norm is no unit's
    fed = {"model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"}
    assert fed <= changed
    assert "model.norm.weight" not in changed
    units = record["blockwise"]["layers"][0]["units"]
    assert [u["norm"] for u in units] == ["input_layernorm", "post_attention_layernorm"]


def test_routers_keep_their_weights_in_submodule_granularity(moe_pruned, tmp_path):
    out = sparseheal.heal(str(moe_pruned), str(tmp_path / "o"), **{**BLOCK, "lr": 1e-2},
                          granularity="submodule")
    before, after = _weights(moe_pruned), _weights(out)
    gates = [k for k in before if k.endswith("mlp.gate.weight") or "shared_expert_gate" in k]
    assert gates and all(torch.equal(before[k], after[k]) for k in gates)
    assert any(not torch.equal(before[k], after[k]) for k in before if "mlp.experts" in k)


def test_early_stopping_keeps_the_best_checked_weights(pruned, tmp_path):
    """At a learning rate that only harms, the first check is the best: the unit stops after `patience`
    worse checks and its untrained weights come back, bit for bit."""
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **{**BLOCK, "epochs": 8, "lr": 5.0},
                          holdout=1, early_stop=2)
    record = json.loads((out / "sparseheal.json").read_text())
    for layer in record["blockwise"]["layers"]:
        (unit,) = layer["units"]
        assert unit["kept_check"] == 0 and unit["steps"] == 2 * 3 < unit["planned_steps"] == 8 * 3
        assert len(unit["heldout"]) == 3 and min(unit["heldout"][1:]) > unit["heldout"][0]
    before, after = _weights(pruned), _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("flags,flag", [
    (["--early-stop", "2"], "--early-stop"),                       # no held-out slice to watch
    (["--holdout", "3", "--batch-size", "2"], "--holdout"),        # not whole batches
    (["--holdout", "4"], "--holdout"),                             # nothing left to train on
    (["--granularity", "blocks"], "--granularity"),
    (["--recon-inputs", "teacher"], "--recon-inputs"),
])
def test_bad_reconstruction_settings_are_refused(pruned, tmp_path, flags, flag):
    out = tmp_path / "o"
    proc = _run("heal", str(pruned), "-o", str(out), "--method", "blockwise", *flags)
    assert proc.returncode == 2 and flag in proc.stderr and not out.exists(), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_submodules_of_a_model_that_has_none_are_refused(tmp_path):
    src = make_arch_dir(tmp_path / "opt", "opt")
    pruned = sparseheal.prune(str(src), str(tmp_path / "p"), method="magnitude", sparsity=0.5)
    proc = _run("heal", str(pruned), "-o", str(tmp_path / "o"), "--method", "blockwise", "--granularity",
                "submodule")
    assert proc.returncode == 2 and "--granularity" in proc.stderr and "fc1" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_reconstruction_settings_with_another_healer_are_refused(pruned, tmp_path):
    proc = _run("heal", str(pruned), "-o", str(tmp_path / "o"), "--method", "full", "--granularity",
                "submodule")
    assert proc.returncode == 2 and "--granularity" in proc.stderr


def test_perp_style_reconstruction_trains_only_norms(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "o"), **{**BLOCK, "lr": 1e-2},
                          recon_params="norms-biases")
    before, after = _weights(pruned), _weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed)
    record = json.loads((out / "sparseheal.json").read_text())
    assert all(x["loss_after"] < x["loss_before"] for x in record["blockwise"]["layers"])
    sub = sparseheal.heal(str(pruned), str(tmp_path / "s"), **{**BLOCK, "lr": 1e-2},
                          recon_params="norms-biases", granularity="submodule")  # each unit: its norm only
    changed = {k for k in before if not torch.equal(before[k], _weights(sub)[k])}
    assert changed == {f"model.layers.{i}.{n}.weight" for i in (0, 1)
                       for n in ("input_layernorm", "post_attention_layernorm")}


def test_a_token_budget_sets_the_length_of_each_healer(pruned, tmp_path):
    lengthless = {k: v for k, v in BLOCK.items() if k != "epochs"}
    # 4 samples of 32 tokens: 1.5 epochs, 6 steps per layer
    bw = sparseheal.heal(str(pruned), str(tmp_path / "bw"), **lengthless, budget_tokens=6 * 32)
    layers = json.loads((bw / "sparseheal.json").read_text())["blockwise"]["layers"]
    assert [unit["steps"] for layer in layers for unit in layer["units"]] == [6, 6]
    full = sparseheal.heal(str(pruned), str(tmp_path / "full"), method="full", block_size=32, batch_size=2,
                           budget_tokens=200, max_eval_samples=1, device="cpu")
    record = json.loads((full / "sparseheal.json").read_text())
    assert record["recipe"]["max_steps"] == 3 and record["recipe"]["budget_tokens"] == 200  # 64 per step


@pytest.mark.parametrize("flags,needle", [
    (["--method", "full", "--block-size", "32", "--budget-tokens", "31"], "at least 32"),
    (["--method", "blockwise", "--budget-tokens", "31"], "at least 32"),
    (["--method", "full", "--budget-tokens", "500", "--max-steps", "3"], "not both"),
])
def test_a_budget_too_small_for_one_step_is_refused(pruned, tmp_path, flags, needle):
    proc = _run("heal", str(pruned), "-o", str(tmp_path / "o"), *flags)
    assert proc.returncode == 2 and "--budget-tokens" in proc.stderr and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_the_relative_loss_weighs_every_token_alike():
    from sparseheal.heal.recon import recon_loss

    target = torch.zeros(1, 2, 8)
    target[0, 0, 0], target[0, 1, 0] = 1000.0, 1.0  # a massive token and an ordinary one
    off_massive, off_ordinary = target.clone(), target.clone()
    off_massive[0, 0, 1] = 10.0  # the same absolute error on either token
    off_ordinary[0, 1, 1] = 10.0
    assert recon_loss(off_massive, target, "mse") == recon_loss(off_ordinary, target, "mse") == 100 / 16
    assert recon_loss(off_massive, target, "relative") == pytest.approx(100 / 1e6 / 2, rel=1e-4)
    assert recon_loss(off_ordinary, target, "relative") == pytest.approx(100 / 2, rel=1e-4)


def test_blockwise_trains_on_the_relative_loss(pruned, tmp_path):
    out = sparseheal.heal(str(pruned), str(tmp_path / "rel"), **BLOCK, recon_loss="relative", holdout=2,
                          batch_size=1)
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["blockwise"]["loss"] == "relative"
    for layer in record["blockwise"]["layers"]:
        held = layer["units"][0]["heldout"]  # relative loss before training and after each of 2 epochs
        assert len(held) == 3 and held[-1] < held[0]
    assert _pruned_weights_are_zero(pruned, out) > 0
    mse = sparseheal.heal(str(pruned), str(tmp_path / "mse"), **BLOCK, holdout=2, batch_size=1)
    rel, by_mse = _weights(out), _weights(mse)  # the same draw, order and seed: only the loss differs
    assert any(not torch.equal(rel[k], by_mse[k]) for k in rel)
