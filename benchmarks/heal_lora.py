"""LoRA healing benchmark: sparseheal against a plain HF Trainer + PEFT script with the same recipe.

On smollm2-135m pruned by Wanda at 50% (64 x 1024 calibration tokens of C4, or ``--pruned DIR``), every
configuration trains ``--steps`` optimizer steps of ``--block-size``-token blocks of the C4 sample
(batch 1, the Wanda LoRA recipe: r=8, alpha=16, dropout 0.05, q_proj,v_proj, lr 1e-4, linear schedule,
seed 0), holding out ``--max-eval-samples`` blocks for the eval loss:

    sparseheal      sparseheal heal --method lora --merge masked
    baseline        the same recipe written as a plain HF Trainer + PEFT script (below, in this file)
    mask-aware      sparseheal with --mask-aware (what masking the update during training costs)
    all-linear-r16  sparseheal with --targets all-linear --rank 16 --alpha 32 (same token budget)

Reported per configuration: training tokens/s (tokens / seconds inside ``Trainer.train``), the peak RSS
of the training process, its wall time, WikiText-2 perplexity (seqlen 1024, first ``--eval-windows``
windows) with the adapter unmerged and merged (masked for sparseheal; PEFT's plain merge for the
baseline, whose resulting sparsity is shown), and the share of the pruning gap closed,
(ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense). Every step runs in its own process.

    python benchmarks/heal_lora.py                                   # the full run (100 steps x 1024)
    python benchmarks/heal_lora.py --steps 5 --block-size 256 --eval-windows 2 --max-eval-samples 4 \\
        --pruned /tmp/pr_wanda                                       # a short check
    python benchmarks/heal_lora.py --mask-aware-cost --pruned DIR --block-size 1024 \\
        [--cost-targets all-linear]                                 # FLOPs and memory of --mask-aware

Timings on a shared CPU are noisy: the table also gives CPU seconds per 1000 training tokens, and a
configuration may be listed twice (``--configs sparseheal,baseline,baseline,sparseheal``); the
target check then averages the runs of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, perplexity, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
CONFIGS = {
    "sparseheal": [],
    "baseline": None,
    "mask-aware": ["--mask-aware"],
    "all-linear-r16": ["--targets", "all-linear", "--rank", "16", "--alpha", "32"],
}


def evaluate_ppl(model: str, args, work: Path, name: str, adapter: str | None = None,
                 reuse: bool = False) -> float:
    """Perplexity of ``model``; with ``reuse``, a result already in ``work`` at the same windows."""
    res = perplexity(model, work / f"eval-{name}.json", args.eval_windows, args.eval_seqlen, args.dtype,
                     adapter, args.device, reuse)
    return round(res["ppl"], 4)


def prune(args, work: Path) -> Path:
    out = work / "pruned-wanda-50"
    cmd = PY + ["prune", args.model, "-o", str(out), "--method", "wanda", "--sparsity", "0.5", "--nsamples",
                str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--overwrite"]
    cmd += ["--device", args.device] if args.device else []
    run_measured(cmd, log=work / "prune.log")
    return out


def run_sparseheal(name: str, pruned: Path, args, work: Path) -> dict:
    out = work / f"heal-{name}"
    cmd = PY + ["heal", str(pruned), "-o", str(out), "--method", "lora", "--data", args.data,
                "--max-steps", str(args.steps), "--block-size", str(args.block_size),
                "--max-eval-samples", str(args.max_eval_samples), "--seed", str(args.seed),
                "--dtype", args.dtype, "--merge", "masked", "--overwrite", *CONFIGS[name]]
    cmd += ["--device", args.device] if args.device else []
    run = run_measured(cmd, log=work / f"{out.name}.log")
    record = json.loads((out / "sparseheal.json").read_text())
    cpu_per_ktok = round(1000 * record["train_cpu_seconds"] / record["tokens_seen"], 3)
    return {"config": name, "tokens_per_second": record["tokens_per_second"], "cpu_s_per_ktok": cpu_per_ktok,
            "peak_rss_mb": run["peak_rss_mb"], "train_s": record["train_seconds"], "wall_s": run["wall_s"],
            "tokens_seen": record["tokens_seen"], "trainable": record["trainable_parameters"],
            "train_loss": record["train_loss"], "final_loss": record["final_loss"],
            "eval_loss": record["eval_loss"],
            "merged_sparsity": record["merged"]["sparsity_after"],
            "ppl": evaluate_ppl(str(pruned), args, work, name, adapter=str(out)),
            "ppl_merged": evaluate_ppl(str(out / "merged"), args, work, f"{name}-merged")}


def run_baseline(pruned: Path, args, work: Path) -> dict:
    out = work / "heal-baseline"
    spec = work / "baseline.json"
    settings = {"pruned": str(pruned), "out": str(out), "steps": args.steps, "block_size": args.block_size,
                "max_eval_samples": args.max_eval_samples, "seed": args.seed, "dtype": args.dtype,
                "device": args.device, "data_dir": args.data_dir}
    spec.write_text(json.dumps(settings))
    run = run_measured([sys.executable, __file__, "--baseline-worker", str(spec)],
                       log=work / "heal-baseline.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"config": "baseline", **metrics, "peak_rss_mb": run["peak_rss_mb"], "wall_s": run["wall_s"],
            "ppl": evaluate_ppl(str(pruned), args, work, "baseline", adapter=str(out / "adapter")),
            "ppl_merged": evaluate_ppl(str(out / "merged"), args, work, "baseline-merged")}


def baseline_data(spec: dict, tokenizer):
    """The C4 sample as run_clm prepares it: tokenize, concatenate, cut into blocks (labels = inputs)."""
    from datasets import load_dataset

    block = spec["block_size"]
    files = sorted(str(p) for p in (Path(spec["data_dir"]) / "c4-en").glob("c4_train_*.jsonl"))
    raw = load_dataset("json", data_files=files, split="train")
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=raw.column_names)

    def group_texts(batch):
        ids = [t for row in batch["input_ids"] for t in row]
        ids = ids[: len(ids) // block * block]
        blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": blocks}

    lm_data = tokenized.map(group_texts, batched=True, batch_size=len(tokenized),
                            remove_columns=tokenized.column_names)
    steps, n_eval = spec["steps"], spec["max_eval_samples"]
    return lm_data.select(range(steps)), lm_data.select(range(steps, steps + n_eval))


def baseline_worker(spec_path: str) -> None:
    """The recipe as a plain script: PEFT LoRA on the pruned model, trained by the HF Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    tokenizer = AutoTokenizer.from_pretrained(spec["pruned"])
    train_data, eval_data = baseline_data(spec, tokenizer)
    set_seed(spec["seed"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["pruned"], dtype=dtype)
    model.config.use_cache = False
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    on_cpu = spec["device"] == "cpu" or (spec["device"] is None and not torch.cuda.is_available())
    training_args = TrainingArguments(
        output_dir=str(out / "trainer"), per_device_train_batch_size=1, per_device_eval_batch_size=1,
        max_steps=spec["steps"], learning_rate=1e-4, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to="none",
        seed=spec["seed"], use_cpu=on_cpu, prediction_loss_only=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
                      data_collator=default_data_collator)
    start, start_cpu = time.perf_counter(), time.process_time()
    result = trainer.train()
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    trainable = model.get_nb_trainable_parameters()[0]
    eval_loss = trainer.evaluate()["eval_loss"] if len(eval_data) else None
    model.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()  # PEFT's plain merge
    merged.save_pretrained(out / "merged")
    tokenizer.save_pretrained(out / "merged")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = spec["steps"] * spec["block_size"]
    metrics = {"tokens_per_second": round(tokens / train_s, 1), "train_s": round(train_s, 3),
               "cpu_s_per_ktok": round(1000 * train_cpu_s / tokens, 3), "tokens_seen": tokens,
               "trainable": trainable,
               "final_loss": losses[-1] if losses else None, "train_loss": result.training_loss,
               "eval_loss": eval_loss, "merged_sparsity": decoder_sparsity(merged)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def decoder_sparsity(model) -> float:
    """Fraction of exact zeros over the decoder layers' linear weights."""
    import torch

    weights = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return round(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights), 6)


class _SavedBytes:
    """Counts the bytes autograd keeps for the backward pass: each storage once, parameters excluded."""

    def __init__(self, model) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params and storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


def _train_step(model, tokens) -> None:
    model(input_ids=tokens, labels=tokens).loss.backward()
    model.zero_grad(set_to_none=True)


def _step_cost(model, tokens, steps: int) -> dict:
    """FLOPs and saved-for-backward bytes of one forward+backward step, and the median seconds of more."""
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    flops, saved = FlopCounterMode(display=False), _SavedBytes(model)
    with flops, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        _train_step(model, tokens)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _train_step(model, tokens)
        times.append(time.perf_counter() - start)
    gflops = flops.get_total_flops() / 1e9
    return {"s_per_step": round(statistics.median(times), 3), "gflops_per_step": round(gflops, 2),
            "saved_for_backward_mib": round(saved.bytes / 2**20, 1)}


def mask_aware_cost(pruned: str, block_size: int, steps: int, targets: str) -> list[dict]:
    """Step time, FLOPs and memory of plain LoRA vs mask-aware LoRA on the same pruned model.

    FLOPs come from ``torch.utils.flop_counter`` (independent of machine load); memory is what autograd
    keeps for the backward pass (each storage once, parameters excluded) plus the mask buffers.
    """
    import torch

    from sparseheal.heal.adapters import model_masks
    from sparseheal.heal.lora import LoraHealer, LoraSettings
    from sparseheal.models import load_model

    rows = []
    for mask_aware in (False, True):
        lm, _, _ = load_model(pruned, "float32", "cpu")
        vocab = lm.get_input_embeddings().num_embeddings
        tokens = torch.randint(0, vocab, (1, block_size), generator=torch.Generator().manual_seed(0))
        masks, _ = model_masks(lm, pruned)
        healer = LoraHealer(LoraSettings(targets=targets, mask_aware=mask_aware))
        model = healer.prepare(lm, masks, seed=0, gradient_checkpointing=False).train()
        cost = _step_cost(model, tokens, steps)
        buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "sparseheal" in n)
        rows.append({"mode": "mask-aware" if mask_aware else "plain", "targets": targets,
                     "block_size": block_size, **cost, "mask_buffers_mib": round(buffers / 2**20, 2)})
    return rows


def gap_closed(pruned: float, healed: float, dense: float) -> float:
    """(ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense)."""
    return round((pruned - healed) / (pruned - dense), 4) if pruned != dense else float("nan")


def _mean_row(rows: list[dict], config: str) -> dict | None:
    """Mean of the numeric columns over the runs of ``config`` (a configuration may be listed twice)."""
    runs = [r for r in rows if r["config"] == config]
    if not runs:
        return None
    keys = ("tokens_per_second", "cpu_s_per_ktok", "peak_rss_mb", "ppl")
    return {k: sum(r[k] for r in runs) / len(runs) for k in keys}


def targets(rows: list[dict]) -> dict | None:
    """The issue's targets: tokens/s >= baseline, peak RSS <= baseline, perplexity equal within noise."""
    ours, base = _mean_row(rows, "sparseheal"), _mean_row(rows, "baseline")
    if ours is None or base is None:
        return None
    return {"tokens_per_second_ratio": round(ours["tokens_per_second"] / base["tokens_per_second"], 3),
            "cpu_per_token_ratio": round(ours["cpu_s_per_ktok"] / base["cpu_s_per_ktok"], 3),
            "peak_rss_ratio": round(ours["peak_rss_mb"] / base["peak_rss_mb"], 3),
            "ppl_relative_difference": round(abs(ours["ppl"] - base["ppl"]) / base["ppl"], 5)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", default=None, help="reuse this pruned directory instead of pruning")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--max-eval-samples", type=int, default=128, help="held-out blocks for the eval loss")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--data", default="c4")
    parser.add_argument("--data-dir", default=None, help="data mirror (default $SPARSEHEAL_DATA_DIR)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration samples when pruning here")
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="bench_results/heal_lora.json")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--mask-aware-cost", action="store_true",
                        help="only measure step time and saved memory, mask-aware vs plain LoRA (--pruned)")
    parser.add_argument("--cost-targets", default="q_proj,v_proj", help="targets of --mask-aware-cost")
    parser.add_argument("--cost-steps", type=int, default=5, help="timed steps of --mask-aware-cost")
    parser.add_argument("--baseline-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.baseline_worker:
        baseline_worker(args.baseline_worker)
        return
    if args.mask_aware_cost:
        if not args.pruned:
            raise SystemExit("--mask-aware-cost needs --pruned DIR")
        rows = mask_aware_cost(args.pruned, args.block_size, args.cost_steps, args.cost_targets)
        print_table(rows, list(rows[0]))
        write_json(Path(args.output), {"settings": vars(args), "machine": machine(), "mask_aware_cost": rows})
        return
    import os

    args.data_dir = args.data_dir or os.environ.get("SPARSEHEAL_DATA_DIR")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if any(c not in CONFIGS for c in configs):
        raise SystemExit(f"--configs: choose from {', '.join(CONFIGS)}")
    if "baseline" in configs and (args.data != "c4" or not args.data_dir):
        raise SystemExit("the baseline reads the mirror's C4 sample: use --data c4 and SPARSEHEAL_DATA_DIR")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-heal-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = evaluate_ppl(args.model, args, work, "dense", reuse=True)  # the dense and pruned results
    # already in --workdir are reused
    pruned = Path(args.pruned) if args.pruned else prune(args, work)
    pruned_ppl = evaluate_ppl(str(pruned), args, work, "pruned", reuse=True)
    print(f"dense ppl {dense}; pruned ppl {pruned_ppl} ({pruned})", flush=True)
    rows = []
    for name in configs:
        if name == "baseline":
            row = run_baseline(pruned, args, work)
        else:
            row = run_sparseheal(name, pruned, args, work)
        row["gap_closed"] = gap_closed(pruned_ppl, row["ppl"], dense)
        row["gap_closed_merged"] = gap_closed(pruned_ppl, row["ppl_merged"], dense)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\ndense ppl {dense}; pruned ppl {pruned_ppl}; {args.steps} steps x {args.block_size} tokens; "
          f"wikitext2 seqlen {args.eval_seqlen}, {args.eval_windows} windows; {args.dtype}")
    columns = ["config", "tokens_per_second", "cpu_s_per_ktok", "peak_rss_mb", "train_s", "wall_s", "ppl",
               "ppl_merged",
               "merged_sparsity", "gap_closed", "gap_closed_merged", "train_loss", "eval_loss"]
    table = print_table(rows, columns)
    check = targets(rows)
    if check:
        print(f"sparseheal / baseline: tokens/s x{check['tokens_per_second_ratio']}, CPU seconds per token "
              f"x{check['cpu_per_token_ratio']}, peak RSS "
              f"x{check['peak_rss_ratio']}, ppl differs by {100 * check['ppl_relative_difference']:.3f}%")
    write_json(Path(args.output), {"settings": vars(args), "machine": machine(), "dense_ppl": dense,
                                   "pruned_ppl": pruned_ppl, "pruned_dir": str(pruned), "rows": rows,
                                   "targets": check, "table": table,
                                   "gap_formula": "(ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense)"})


if __name__ == "__main__":
    main()
