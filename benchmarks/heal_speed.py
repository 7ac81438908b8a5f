"""Healing throughput: sparseheal's LoRA and full healers against a plain HF Trainer (+ PEFT) script.

On one pruned directory (``--pruned``, e.g. Wanda 50% of smollm2-135m), each configuration trains
``--steps`` optimizer steps of ``--block-size``-token blocks of the C4 sample (batch 1, seed 0, no
held-out evaluation, no checkpoints), each in its own process, and the configurations run alternately
``--repeats`` times (sparseheal lora, plain lora, sparseheal full, plain full, then again), so that slow
phases of a shared machine fall on both sides:

    sparseheal lora   sparseheal heal --method lora (r=8, alpha 16, dropout 0.05, q_proj,v_proj)
    plain lora        the same adapter by PEFT, trained by a bare ``Trainer`` (heal_lora.py's baseline)
    sparseheal full   sparseheal heal --method full (linears and norms train; gradients and weights
                      masked every step, so pruned weights stay +0.0)
    plain full        the same parameters trained by a bare ``Trainer`` with no mask (the pruned weights
                      drift away from zero: what the mask costs is inside sparseheal's time)

Reported: training tokens/s (tokens / seconds inside ``Trainer.train``), CPU seconds per 1000 tokens and
the process's peak RSS, as the median and range of the runs, and sparseheal's median over the plain
script's.

    python benchmarks/heal_speed.py --pruned DIR                       # 3 x 4 runs of 20 x 512 tokens
    python benchmarks/heal_speed.py --pruned DIR --steps 4 --repeats 1 --methods lora
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_measured, write_json  # noqa: E402
from heal_lora import baseline_data  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]


def run_ours(method: str, args, out: Path) -> dict:
    cmd = PY + ["heal", args.pruned, "-o", str(out), "--method", method, "--data", "c4", "--max-steps",
                str(args.steps), "--block-size", str(args.block_size), "--max-eval-samples", "0", "--seed",
                "0", "--dtype", "float32", "--lr", str(args.lr), "--scheduler", "linear", "--overwrite"]
    run = run_measured(cmd, log=out.with_suffix(".log"))
    record = json.loads((out / "sparseheal.json").read_text())
    return {"tokens_per_second": record["tokens_per_second"], "train_s": record["train_seconds"],
            "cpu_s_per_ktok": round(1000 * record["train_cpu_seconds"] / record["tokens_seen"], 3),
            "peak_rss_mb": run["peak_rss_mb"]}


def run_plain(method: str, args, out: Path) -> dict:
    spec = out.with_suffix(".spec.json")
    spec.write_text(json.dumps({"method": method, "pruned": args.pruned, "out": str(out), "steps": args.steps,
                                "block_size": args.block_size, "lr": args.lr, "max_eval_samples": 0,
                                "data_dir": os.environ["SPARSEHEAL_DATA_DIR"]}))
    run = run_measured([sys.executable, __file__, "--worker", str(spec)], log=out.with_suffix(".log"))
    return {**json.loads((out / "metrics.json").read_text()), "peak_rss_mb": run["peak_rss_mb"]}


def plain_worker(spec_path: str) -> None:
    """The plain script: the pruned model, PEFT LoRA or the same trainable set, a bare Trainer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers import default_data_collator as collate

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["pruned"])
    train_data, _ = baseline_data(spec, tokenizer)
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["pruned"], dtype=torch.float32)
    model.config.use_cache = False
    if spec["method"] == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none",
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    else:  # linears and norms, as sparseheal's full healer trains by default; embeddings and head frozen
        for name, param in model.named_parameters():
            param.requires_grad_(not name.endswith(("embed_tokens.weight", "lm_head.weight")))
    targs = TrainingArguments(output_dir=str(Path(spec["out"]) / "trainer"), per_device_train_batch_size=1,
                              max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear",
                              logging_steps=10, save_strategy="no", report_to="none", seed=0, use_cpu=True)
    trainer = Trainer(model=model, args=targs, train_dataset=train_data, data_collator=collate)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    tokens = spec["steps"] * spec["block_size"]
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / "metrics.json").write_text(json.dumps(
        {"tokens_per_second": round(tokens / seconds, 1), "train_s": round(seconds, 3),
         "cpu_s_per_ktok": round(1000 * cpu / tokens, 3)}))


def summarize(rows: list[dict]) -> list[dict]:
    """Median and range per (method, tool); sparseheal's ratios to the plain script's medians."""
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        medians = {}
        for tool in ("sparseheal", "plain"):
            runs = [r for r in rows if (r["method"], r["tool"]) == (method, tool)]
            if not runs:
                continue
            speed = [r["tokens_per_second"] for r in runs]
            row = {"method": method, "tool": tool, "runs": len(runs),
                   "tokens_per_second": statistics.median(speed), "range": f"{min(speed):g}-{max(speed):g}",
                   "cpu_s_per_ktok": statistics.median(r["cpu_s_per_ktok"] for r in runs),
                   "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs)}
            medians[tool] = row
            table.append(row)
        if len(medians) == 2:
            ours, plain = medians["sparseheal"], medians["plain"]
            ours["x_plain_tokens_s"] = round(ours["tokens_per_second"] / plain["tokens_per_second"], 3)
            ours["x_plain_rss"] = round(ours["peak_rss_mb"] / plain["peak_rss_mb"], 3)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", help="the pruned model directory every run heals")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/heal_speed.json")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        plain_worker(args.worker)
        return
    if not args.pruned:
        raise SystemExit("--pruned: give the pruned model directory to heal")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-heal-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            for tool, runner in (("sparseheal", run_ours), ("plain", run_plain)):
                row = {"method": method, "tool": tool, "repeat": repeat,
                       **runner(method, args, work / f"{tool}-{method}-{repeat}")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_json(Path(args.output), {"settings": vars(args), "machine": machine(), "runs": rows,
                                               "summary": summarize(rows)})
    print_table(summarize(rows), ["method", "tool", "runs", "tokens_per_second", "range", "x_plain_tokens_s",
                                  "cpu_s_per_ktok", "peak_rss_mb", "x_plain_rss"])


if __name__ == "__main__":
    main()
