"""Full fine-tuning under the sparsity mask: the mask invariant under adversarial optimisers, the
output directory, resume equivalence, and refusals of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_model_dir
from transformers import AutoModelForCausalLM, TrainerCallback

import sparseheal
from sparseheal.api import heal
from sparseheal.cli import main
from sparseheal.heal.full import FullHealer, select_trainable, verify_saved_masks
from sparseheal.sparsity.masks import count_violations
from sparseheal.sparsity.store import load_masks

FAST = dict(method="full", block_size=32, max_eval_samples=2, logging_steps=1)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("full") / "pruned"
    return sparseheal.prune(str(llama_dir), str(out), method="magnitude", sparsity=0.5)


def _masks(model_dir):
    return load_masks(model_dir / "sparsity_masks.safetensors")[0]


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _cfg(pruned_dir, **overrides):
    return dict(seed=0, gradient_checkpointing=False)


def _adversarial_loop(model, optimizer, steps: int = 3, accumulation: int = 2, bf16: bool = True) -> None:
    """Micro-batches with accumulation, clipping to 0.1 and bf16 autocast on the CPU."""
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        for _ in range(accumulation):
            ids = torch.randint(0, 256, (2, 16), generator=generator)  # (B, T)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.1)
        optimizer.step()
        optimizer.zero_grad()


def _violations(model, masks) -> int:
    modules = dict(model.named_modules())
    return sum(count_violations(modules[name].weight, mask) for name, mask in masks.items())


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "sgd-momentum"])
def test_mask_kept_under_adversarial_loop(pruned_dir, make_optimizer):
    masks = _masks(pruned_dir)
    control = AutoModelForCausalLM.from_pretrained(pruned_dir)  # same loop, no keeper: the mask breaks
    _adversarial_loop(control, make_optimizer(control.parameters()))
    assert _violations(control, masks) > 1000

    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    before = _weights(model)
    healer = FullHealer()
    healer.prepare(model, masks, **_cfg(pruned_dir))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
    healer.keeper.attach(optimizer)
    _adversarial_loop(model, optimizer)
    assert _violations(model, masks) == 0
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        assert not torch.equal(weight[mask], before[f"{name}.weight"][mask])  # kept weights trained
        for state in optimizer.state[weight].values():  # moments never saw a pruned gradient
            if torch.is_tensor(state) and state.shape == weight.shape:
                assert not state[~mask].any()


def _masked_fill_reference(model, masks, optimizer) -> None:
    """The keeper written as masked fills with +0.0 (gradient before accumulation, weight after the step)."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        pruned = ~mask
        modules[name].weight.register_hook(lambda grad, pruned=pruned: grad.masked_fill(pruned, 0.0))

    def remask(*_):
        with torch.no_grad():
            for name, mask in masks.items():
                modules[name].weight.masked_fill_(~mask, 0.0)

    remask()
    optimizer.register_step_post_hook(remask)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.AdamW(params, lr=2.0, weight_decay=1.0),  # 1 - lr * wd < 0
    lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "adamw-sign-flip", "sgd-momentum"])
def test_keeper_products_equal_masked_fills_bit_for_bit(pruned_dir, make_optimizer):
    """The keeper's products with the keep-mask give the bits of masked fills with +0.0, step for step."""
    masks = _masks(pruned_dir)
    bits = {}
    for keeper in (True, False):
        model = AutoModelForCausalLM.from_pretrained(pruned_dir)
        name = next(iter(masks))
        with torch.no_grad():  # -0.0 at the pruned positions of one layer, as a sign flip would leave
            dict(model.named_modules())[name].weight[~masks[name]] = -0.0
        healer = FullHealer()
        if keeper:
            healer.prepare(model, masks, **_cfg(pruned_dir))
        else:
            select_trainable(model, masks, train_embeddings=False, train_norms=True)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        if keeper:
            healer.keeper.attach(optimizer)
        else:
            _masked_fill_reference(model, masks, optimizer)
        _adversarial_loop(model, optimizer, bf16=False)
        bits[keeper] = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters()}
    assert bits[True].keys() == bits[False].keys()
    for name in bits[True]:
        assert torch.equal(bits[True][name], bits[False][name]), name


def test_negative_zero_canonicalised(pruned_dir):
    """AdamW with lr * wd = 2 multiplies weights by -1: +0.0 becomes -0.0 unless re-masked after the step."""
    masks = _masks(pruned_dir)
    runs = {}
    for attach in (False, True):
        model = AutoModelForCausalLM.from_pretrained(pruned_dir)
        name = next(iter(masks))
        with torch.no_grad():  # start from -0.0 at the pruned positions of one layer
            dict(model.named_modules())[name].weight[~masks[name]] = -0.0
        healer = FullHealer()
        healer.prepare(model, masks, **_cfg(pruned_dir))
        assert _violations(model, masks) == 0  # prepare canonicalises -0.0 to +0.0
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2.0, weight_decay=1.0)
        if attach:
            healer.keeper.attach(optimizer)
        _adversarial_loop(model, optimizer, steps=1, accumulation=1, bf16=False)
        runs[attach] = _violations(model, masks)
        weight = dict(model.named_modules())[name].weight
        pruned_values = weight[~masks[name]]
        assert not pruned_values.any()  # numerically zero either way (gradients were masked)
    assert runs[False] > 0 and runs[True] == 0


@pytest.mark.parametrize("extra", [{}, {"bf16": True}, {"gradient_checkpointing": True, "method": "dense"}],
                         ids=["fp32", "bf16-autocast", "checkpointing-dense-alias"])
def test_heal_full_keeps_mask_with_trainer(pruned_dir, tmp_path, extra):
    out = heal(str(pruned_dir), str(tmp_path / "out"), max_steps=3, lr=1e-2, weight_decay=0.1,
               gradient_accumulation=2, max_grad_norm=0.1, **{**FAST, **extra})
    record = json.loads((out / "sparseheal.json").read_text())
    assert record["method"] == "full" and record["masks_from"] == "file" and record["steps"] == 3
    verification = record["mask_verification"]
    assert verification["ok"] and verification["mask_violations"] == 0 and verification["negative_zeros"] == 0
    masks = _masks(pruned_dir)
    assert verification["pruned_parameters"] == sum(int((~m).sum()) for m in masks.values())
    healed = AutoModelForCausalLM.from_pretrained(out)  # a normal HF directory
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    linears = sum(m.numel() for m in masks.values())
    norms = sum(p.numel() for n, p in healed.named_parameters() if "norm" in n)
    assert record["trainable_parameters"] == linears + norms  # embeddings and lm_head frozen
    assert record["trainable_surviving_parameters"] == linears + norms - verification["pruned_parameters"]
    assert record["total_parameters"] == sum(p.numel() for p in healed.parameters())
    assert _violations(healed, masks) == 0
    report = sparseheal.inspect(str(out))  # inspect agrees with the record
    assert report["ok"] and report["mask_violations"] == verification["mask_violations"] == 0
    saved_masks = _masks(out)
    assert all(torch.equal(saved_masks[n], masks[n]) for n in masks)
    name = next(iter(masks))
    changed = dict(healed.named_modules())[name].weight != dict(pruned.named_modules())[name].weight
    assert changed[masks[name]].any() and not changed[~masks[name]].any()
    assert torch.equal(healed.model.embed_tokens.weight, pruned.model.embed_tokens.weight)  # frozen
    assert (out / "train_log.jsonl").is_file() and not (tmp_path / "out.ckpt").exists()


def test_select_trainable_roles(tmp_path):
    gpt2 = AutoModelForCausalLM.from_pretrained(make_model_dir(tmp_path / "gpt2", "gpt2"))
    roles = select_trainable(gpt2, {}, train_embeddings=False, train_norms=True)
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.weight" in trainable and "transformer.h.0.ln_1.weight" in trainable
    assert "transformer.ln_f.weight" in trainable and "transformer.h.0.attn.c_attn.bias" in trainable
    assert "transformer.wte.weight" not in trainable and "transformer.wpe.weight" not in trainable
    assert set(roles["embeddings"]) == {"transformer.wte.weight", "transformer.wpe.weight"}
    select_trainable(gpt2, {}, train_embeddings=True, train_norms=False)
    trainable = {n for n, p in gpt2.named_parameters() if p.requires_grad}
    assert "transformer.wte.weight" in trainable and "transformer.ln_f.weight" not in trainable


def test_optimizer_memory_per_parameter(pruned_dir):
    """Accounting of what full fine-tuning holds per trainable parameter after one AdamW step (fp32):
    weight 4 + gradient 4 + two moments 8 + the bit-packed keep-mask 1/8 = 16.125 bytes."""
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    masks = _masks(pruned_dir)
    healer = FullHealer()
    healer.prepare(model, masks, **_cfg(pruned_dir))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    healer.keeper.attach(optimizer)
    _adversarial_loop(model, optimizer, steps=1, accumulation=1, bf16=False)
    ids = torch.randint(0, 256, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    masked = {id(w) for _, w, _ in healer.keeper.entries}
    per_param = []
    for p in params:
        state = sum(t.numel() * t.element_size() for t in optimizer.state[p].values() if t.dim() > 0)
        mask = next((m.bits.numel() for _, w, m in healer.keeper.entries if w is p), 0)  # packed
        total = p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() + state + mask
        per_param.append((total / p.numel(), id(p) in masked))
    assert {value for value, is_masked in per_param if is_masked} == {16.125}
    assert {value for value, is_masked in per_param if not is_masked} == {16.0}  # norms: no mask


def test_verify_saved_masks_counts_negative_zero(pruned_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    masks = _masks(pruned_dir)
    name = next(iter(masks))
    position = (~masks[name]).nonzero()[0].tolist()
    with torch.no_grad():
        dict(model.named_modules())[name].weight[tuple(position)] = -0.0
    model.save_pretrained(tmp_path / "m")
    report = verify_saved_masks(tmp_path / "m", masks)
    assert not report["ok"] and report["mask_violations"] == 1 and report["negative_zeros"] == 1


class _Interrupt(RuntimeError):
    pass


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise _Interrupt(f"interrupted after step {self.step}")


def test_resume_equivalence(pruned_dir, tmp_path, monkeypatch):
    settings = dict(max_steps=4, save_steps=2, lr=1e-3, weight_decay=0.1, seed=3, **FAST)
    whole = heal(str(pruned_dir), str(tmp_path / "whole"), **settings)

    original = FullHealer.callbacks
    monkeypatch.setattr(FullHealer, "callbacks", lambda self: [*original(self), _StopAt(3)])
    with pytest.raises(_Interrupt):
        heal(str(pruned_dir), str(tmp_path / "resumed"), **settings)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.ckpt" / "checkpoint-2").is_dir()
    monkeypatch.setattr(FullHealer, "callbacks", original)
    resumed = heal(str(pruned_dir), str(tmp_path / "resumed"), resume=True, **settings)

    a = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "sparseheal.json").read_text())["mask_verification"]["ok"]


def _cli_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sparseheal: error:")]
    assert len(lines) == 1
    return lines[0]


def test_bad_input_exit_2_naming_the_flag(pruned_dir, llama_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = ["heal", str(pruned_dir), "-o", out, "--method", "full", "--block-size", "32", "--max-steps", "1"]
    assert "PRUNED_DIR" in _cli_error(capsys, ["heal", str(llama_dir), "-o", out, "--method", "full",
                                               "--block-size", "32", "--max-steps", "1"])
    assert "--temperature" in _cli_error(capsys, [*base, "--distill", "kl", "--temperature", "0"])
    assert "--distill-alpha" in _cli_error(capsys, [*base, "--distill", "kl", "--distill-alpha", "1.5"])
    assert "--distill" in _cli_error(capsys, [*base, "--distill", "mse"])
    assert "--self-batch-size" in _cli_error(capsys, [*base, "--data", "self", "--self-batch-size", "0"])

    other = make_model_dir(tmp_path / "other", "llama")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 320
    (other / "config.json").write_text(json.dumps(config))
    assert "--teacher" in _cli_error(capsys, [*base, "--distill", "kl", "--teacher", str(other)])

    orphan = tmp_path / "orphan"  # a pruned directory whose dense model is gone
    shutil.copytree(pruned_dir, orphan)
    record = json.loads((orphan / "sparseheal.json").read_text())
    record.update(base_model=str(tmp_path / "gone"), base_path=str(tmp_path / "gone"))
    (orphan / "sparseheal.json").write_text(json.dumps(record))
    message = _cli_error(capsys, ["heal", str(orphan), "-o", out, "--method", "full", "--block-size", "32",
                                  "--distill", "kl"])
    assert "--teacher" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()


@pytest.mark.parametrize("chunk", [16 * 2**20, 40])
def test_the_finiteness_check_finds_one_bad_value_in_any_tensor(tmp_path, monkeypatch, chunk):
    """Read in row chunks (40 bytes: a few rows at a time), one inf in a late row of a float32 matrix, a
    NaN in a bfloat16 vector or in a 0-d tensor is found and named; integer tensors are skipped."""
    from safetensors.torch import save_file

    from sparseheal import sources
    from sparseheal.errors import StageError
    from sparseheal.heal import output

    monkeypatch.setattr(sources, "_CHUNK_BYTES", chunk)  # where the chunked reader lives
    clean = {"a.weight": torch.randn(37, 5), "b.bias": torch.randn(7).bfloat16(),
             "c.scale": torch.tensor(2.0), "d.ids": torch.arange(9)}
    save_file(clean, str(tmp_path / "model.safetensors"))
    output.check_finite_weights(tmp_path)
    for name, index in [("a.weight", (36, 4)), ("b.bias", (6,)), ("c.scale", ())]:
        broken = {k: v.clone() for k, v in clean.items()}
        broken[name][index] = float("inf") if name == "a.weight" else float("nan")
        save_file(broken, str(tmp_path / "model.safetensors"))
        with pytest.raises(StageError, match=f"1 weights that are not finite \\(first in {name}\\)"):
            output.check_finite_weights(tmp_path)


class _PostHookMasking(TrainerCallback):
    """The earlier masked update: an optimizer step post-hook attached to the Trainer's optimizer."""

    def __init__(self, keeper) -> None:
        self.keeper = keeper

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.keeper.attach(optimizer)
        self.keeper.apply()


class _WriteIntoPruned(TrainerCallback):
    """Before every optimizer step, writes 1.0 into a pruned position (as an optimizer might): only a
    re-mask after the step takes it out again."""

    def __init__(self, weight: torch.Tensor, position: tuple) -> None:
        self.weight, self.position = weight, position

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.weight[self.position] = 1.0


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_the_masked_update_callback_gives_the_bits_of_the_step_post_hook(pruned_dir, tmp_path, optim):
    """The Trainer step with the re-mask in ``on_optimizer_step`` equals the step post-hook it replaced, bit
    for bit, under AdamW and SGD (with weight decay and clipping)."""
    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))  # (N, T)
    data = [{"input_ids": row, "labels": row} for row in ids]
    results = {}
    for variant in ("callback", "post-hook"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(pruned_dir)
        healer = FullHealer()
        healer.prepare(model, _masks(pruned_dir), **_cfg(pruned_dir))
        callback = healer.callbacks()[0] if variant == "callback" else _PostHookMasking(healer.keeper)
        weight = model.model.layers[0].self_attn.q_proj.weight
        dirty = _WriteIntoPruned(weight, tuple((weight == 0).nonzero()[0].tolist()))
        args = TrainingArguments(
            output_dir=str(tmp_path / variant), max_steps=4, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=5e-2, weight_decay=0.5, max_grad_norm=0.1,
            optim=optim, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
            data_seed=0)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[dirty, callback]).train()
        results[variant] = {n: p.detach().view(torch.int32).clone() for n, p in model.named_parameters()}
        assert _violations(model, _masks(pruned_dir)) == 0
    assert all(torch.equal(results["callback"][n], results["post-hook"][n]) for n in results["callback"])
    assert any(not torch.equal(results["callback"][n], w.view(torch.int32))
               for n, w in _weights(AutoModelForCausalLM.from_pretrained(pruned_dir)).items())  # it trained
