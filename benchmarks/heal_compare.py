"""Healing comparison on smollm2-135m pruned by Wanda (50% unstructured and 2:4), at one token budget.

Configurations, each trained for the same ``--steps`` x ``--block-size`` tokens (batch 1, no
accumulation) on the C4 sample unless noted:

    1 lora          LoRA, the default recipe (r=8, alpha=16, q_proj,v_proj, lr 1e-4)
    2 lora-all-r16  LoRA on all linear layers, r=16, alpha=32 (alpha / r = 2 as in the default)
    3 full          full fine-tuning under the mask (lr 2e-5, cosine)
    4 lora-kl       1 + KL distillation from the dense model (T=2, alpha 0.5)
    5 full-kl       3 + KL distillation
    6 full-kl-self  5 on text the dense model generated itself (--data self), no external corpus
    7 full-kl-lr1e-4   5 at lr 1e-4 (5x the full default): the budget is short
    8 lora-all-r16-kl  2 + KL distillation
    9 full-lr1e-4      3 at lr 1e-4, no teacher: what configuration 7 owes to the rate alone
   10 full-kl-lr3e-4   5 at lr 3e-4 with 10 warm-up steps
   11 full-klsq-lr1e-4 7 with SquareHead added to the KL (--distill kl,squarehead)
   12 full-kl-lr1e-3   5 at lr 1e-3 with 10 warm-up steps
   13 full-lr3e-4      10 without the teacher
   14 full-kd-lr3e-4   10 with the teacher's distribution as the only target (alpha 1, T=1)

Reports WikiText-2 perplexity (seqlen 1024, first ``--eval-windows`` windows), the share of the pruning
gap closed, (ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense), training tokens/s and the peak RSS of
the healing process. Every prune, heal and evaluation runs in its own process.

    python benchmarks/heal_compare.py                                   # the full comparison
    python benchmarks/heal_compare.py --steps 3 --block-size 256 --eval-windows 2 --patterns 50% \\
        --pruned-50 /tmp/pr_wanda                                       # a short check
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, perplexity, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
CONFIGS = {
    "lora": ["--method", "lora"],
    "lora-all-r16": ["--method", "lora", "--targets", "all-linear", "--rank", "16", "--alpha", "32"],
    "full": ["--method", "full"],
    "lora-kl": ["--method", "lora", "--distill", "kl"],
    "full-kl": ["--method", "full", "--distill", "kl"],
    "full-kl-self": ["--method", "full", "--distill", "kl", "--data", "self"],
    "full-kl-lr1e-4": ["--method", "full", "--distill", "kl", "--lr", "1e-4"],
    "lora-all-r16-kl": ["--method", "lora", "--targets", "all-linear", "--rank", "16", "--alpha", "32",
                        "--distill", "kl"],
    "full-lr1e-4": ["--method", "full", "--lr", "1e-4"],
    "full-kl-lr3e-4": ["--method", "full", "--distill", "kl", "--lr", "3e-4", "--warmup-steps", "10"],
    "full-klsq-lr1e-4": ["--method", "full", "--distill", "kl,squarehead", "--lr", "1e-4"],
    "full-kl-lr1e-3": ["--method", "full", "--distill", "kl", "--lr", "1e-3", "--warmup-steps", "10"],
    "full-lr3e-4": ["--method", "full", "--lr", "3e-4", "--warmup-steps", "10"],
    "full-kd-lr3e-4": ["--method", "full", "--distill", "kl", "--distill-alpha", "1", "--temperature", "1",
                       "--lr", "3e-4", "--warmup-steps", "10"],
}
PATTERNS = {"50%": "unstructured", "2:4": "2:4"}
DISTILLED = tuple(name for name, flags in CONFIGS.items() if "--distill" in flags)


def parse_configs(value: str) -> list[str]:
    """``--configs``: names or numbers (1 for the first of CONFIGS), comma-separated."""
    names = list(CONFIGS)
    chosen = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        name = names[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(names) else item
        if name not in CONFIGS:
            raise SystemExit(f"--configs: unknown {item!r}; choose from 1-{len(names)} or {', '.join(names)}")
        chosen.append(name)
    return chosen


def evaluate_ppl(model: str, args, work: Path, name: str, adapter: str | None = None,
                 reuse: bool = False) -> dict:
    """Perplexity of ``model``; with ``reuse``, a result already in ``work`` at the same windows."""
    res = perplexity(model, work / f"eval-{name}.json", args.eval_windows, adapter=adapter,
                     device=args.device, reuse=reuse and not args.fresh)
    return {"ppl": round(res["ppl"], 3), "eval_windows": res["windows"], "eval_dtype": res["dtype"]}


def prune(args, pattern: str, work: Path) -> Path:
    out = work / f"pruned-{pattern.replace(':', 'of')}"
    cmd = PY + ["prune", args.model, "-o", str(out), "--method", "wanda", "--pattern", pattern,
                "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--overwrite"]
    cmd += ["--device", args.device] if args.device else []
    run_measured(cmd, log=work / f"{out.name}.log")
    return out


def heal_args(name: str, args) -> list[str]:
    """The heal flags of configuration ``name`` at the common budget."""
    flags = ["--max-steps", str(args.steps), "--block-size", str(args.block_size), "--batch-size", "1",
             "--gradient-accumulation", "1", "--max-eval-samples", "0", "--logging-steps", "10",
             "--seed", str(args.seed), "--overwrite", *CONFIGS[name]]
    if name.endswith("-self"):  # enough generated text for the whole budget
        sequences = math.ceil(args.steps * args.block_size / args.self_length)
        flags += ["--self-sequences", str(sequences), "--self-length", str(args.self_length)]
    else:
        flags += ["--data", args.data]
    flags += ["--device", args.device] if args.device else []
    return flags


def heal_and_eval(name: str, pruned: Path, label: str, args, work: Path) -> dict | None:
    """One configuration's row; a row finished earlier in the same ``--workdir`` is reused.

    With ``--only-finished``, a configuration without such a row is skipped (None).
    """
    cached = work / f"row-{label}-{name}.json"
    if cached.is_file() and not args.fresh:
        row = json.loads(cached.read_text())
        if row.get("budget") == [args.steps, args.block_size, args.seed, args.eval_windows]:
            return row
    if args.only_finished:
        return None
    row = _heal_and_eval(name, pruned, label, args, work)
    row["budget"] = [args.steps, args.block_size, args.seed, args.eval_windows]
    cached.write_text(json.dumps(row))
    return row


def _heal_and_eval(name: str, pruned: Path, label: str, args, work: Path) -> dict:
    out = work / f"healed-{label}-{name}"
    run = run_measured(PY + ["heal", str(pruned), "-o", str(out), *heal_args(name, args)],
                       log=work / f"{out.name}.log")
    record = json.loads((out / "sparseheal.json").read_text())
    lora = record["method"] == "lora"
    ppl = evaluate_ppl(str(pruned) if lora else str(out), args, work, out.name, str(out) if lora else None)
    verification = record.get("mask_verification", {})
    data = record.get("data", {})
    return {"config": name, **ppl, "tokens_per_second": record["tokens_per_second"],
            "peak_rss_mb": run["peak_rss_mb"], "train_s": record["train_seconds"],
            "cpu_s_per_ktok": round(1000 * record["train_cpu_seconds"] / record["tokens_seen"], 3),
            "heal_wall_s": run["wall_s"], "steps": record["steps"], "tokens_seen": record["tokens_seen"],
            "final_loss": record.get("final_loss"),
            "mask_violations": verification.get("mask_violations"),
            "selfgen_s": _selfgen_seconds(data)}


def _selfgen_seconds(data: dict) -> float | str | None:
    """Seconds the teacher spent writing --data self text ("cached" when it was reused)."""
    if data.get("source") != "self":
        return None
    return "cached" if data.get("cached") else data.get("generation_seconds")




def _full_student(pruned: str):
    """Child process: the pruned model in float32 prepared for full fine-tuning.

    Returns (model, healer, RSS in MiB after loading, before preparing).
    """
    import psutil

    from sparseheal.heal.adapters import model_masks
    from sparseheal.heal.full import FullHealer
    from sparseheal.models import load_model

    lm, _, _ = load_model(pruned, "float32", "cpu")
    rss_loaded = psutil.Process().memory_info().rss / 2**20
    masks, _ = model_masks(lm, pruned)
    healer = FullHealer()
    healer.prepare(lm, masks, seed=0, gradient_checkpointing=False)
    return lm, healer, rss_loaded


def measure_memory(pruned: str, block_size: int) -> dict:
    """Child process: bytes that full fine-tuning holds per parameter after one AdamW step (float32).

    Counts tensors (weights, gradients, optimizer moments, pruned-position masks) and the process RSS.
    """
    import torch

    from sparseheal.records import peak_rss_mb

    lm, healer, rss_loaded = _full_student(pruned)
    params = [p for p in lm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    healer.keeper.attach(optimizer)
    ids = torch.randint(0, lm.config.vocab_size, (1, block_size))  # (1, T)
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in lm.parameters())
    sizes = {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params),
        "moments": sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                       if t.dim() > 0),
        "masks": sum(m.numel() * m.element_size() for _, _, m in healer.keeper.entries),
    }
    per_param = {k: round(v / trainable, 3) for k, v in sizes.items()}
    return {"parameters": total, "trainable": trainable, "bytes_per_trainable": per_param,
            "bytes_per_trainable_total": round(sum(sizes.values()) / trainable, 3),
            "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_bytes_per_parameter": round(peak_rss_mb() * 2**20 / total, 2), "block_size": block_size}


def measure_kl_memory(pruned: str, block_size: int, chunk: int) -> dict:
    """Child process: peak RSS of one full fine-tuning step with KL distillation from the dense model.

    ``chunk`` is the KL's tokens per chunk (0: the whole (B, T, V) softmaxes at once).
    """
    import torch

    from sparseheal.heal import distill
    from sparseheal.records import peak_rss_mb, read_record

    lm, _, _ = _full_student(pruned)
    settings = distill.DistillSettings(distill="kl")
    distiller = distill.build_distiller(settings, lm, pruned, read_record(pruned))
    distiller.kl_chunk_tokens = chunk or None
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.randint(0, lm.config.vocab_size, (1, block_size), generator=torch.Generator().manual_seed(0))
    lm.train()
    outputs = lm(input_ids=ids, labels=ids)  # (1, T, V) logits
    loss, parts = distiller(outputs, {"input_ids": ids}, outputs.loss)
    loss.backward()
    optimizer.step()
    return {"kl_chunk_tokens": chunk or "whole", "peak_rss_mb": round(peak_rss_mb(), 1),
            "kl_loss": round(parts["kl_loss"], 6), "block_size": block_size}


def memory_row(pruned: Path, args, work: Path) -> dict:
    out = work / "memory.json"
    earlier = json.loads(out.read_text()) if out.is_file() and not args.fresh else None
    if earlier and earlier["block_size"] == args.block_size:
        return earlier
    cmd = [sys.executable, __file__, "--measure-memory", str(pruned), "--block-size", str(args.block_size),
           "--output", str(out)]
    run_measured(cmd, log=work / "memory.log")
    return json.loads(out.read_text())


def kl_memory_table(args) -> None:
    """``--kl-memory``: one full + KL step per KL chunk size, each in its own process."""
    if args.kl_chunk is not None:
        Path(args.output).write_text(json.dumps(measure_kl_memory(args.kl_memory, args.block_size,
                                                                   args.kl_chunk)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-kl-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for chunk in (0, 256):
        out = work / f"kl-memory-{chunk}.json"
        cmd = [sys.executable, __file__, "--kl-memory", args.kl_memory, "--kl-chunk", str(chunk),
               "--block-size", str(args.block_size), "--output", str(out)]
        run_measured(cmd, log=work / f"kl-memory-{chunk}.log")
        rows.append(json.loads(out.read_text()))
    print_table(rows, list(rows[0]))
    write_json(Path(args.output), {"settings": vars(args), "machine": machine(), "kl_memory": rows})


def gap_closed(pruned: float, healed: float, dense: float) -> float:
    """(ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense)."""
    return (pruned - healed) / (pruned - dense) if pruned != dense else float("nan")


def compare_pattern(label: str, pruned: Path, dense_ppl: float, configs: list[str], args, work: Path) -> dict:
    tag = label.replace(":", "of").replace("%", "")
    base = evaluate_ppl(str(pruned), args, work, f"pruned-{tag}", reuse=True)
    rows, not_run = [], []
    for name in configs:
        healed = heal_and_eval(name, pruned, tag, args, work)
        if healed is None:
            not_run.append(name)
            continue
        row = {"pattern": label, **healed}
        row["gap_closed"] = round(gap_closed(base["ppl"], row["ppl"], dense_ppl), 4)
        row["gap_closed_pct"] = round(100 * row["gap_closed"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    default = next((r["gap_closed"] for r in rows if r["config"] == "lora"), None)
    distilled = [r for r in rows if r["config"] in DISTILLED]
    best = max(distilled, key=lambda r: r["gap_closed"]) if distilled else None
    target = None
    if default is not None and best is not None:
        ratio = best["gap_closed"] / default if default > 0 else float("inf")
        target = {"best_distilled": best["config"], "best_gap_closed": best["gap_closed"],
                  "lora_default_gap_closed": default, "ratio": round(ratio, 3), "met": ratio >= 2.0}
    return {"pruned_dir": str(pruned), "pruned_ppl": base["ppl"], "rows": rows, "not_run": not_run,
            "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--patterns", default="50%,2:4", help="comma-separated: 50%% and/or 2:4")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"numbers 1-{len(CONFIGS)} or names, comma-separated (default: all)")
    parser.add_argument("--pruned-50", default=None, help="reuse this Wanda 50%% directory")
    parser.add_argument("--pruned-24", default=None, help="reuse this Wanda 2:4 directory")
    parser.add_argument("--data", default="c4")
    parser.add_argument("--self-length", type=int, default=256, help="tokens per self-generated sequence")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration samples when pruning here")
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default="bench_results/heal_compare.json")
    parser.add_argument("--workdir", default=None, help="rows finished earlier in it are reused")
    parser.add_argument("--fresh", action="store_true", help="ignore rows finished earlier in --workdir")
    parser.add_argument("--only-finished", action="store_true",
                        help="only tabulate the rows already finished in --workdir; run nothing new")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)  # child process mode
    parser.add_argument("--kl-memory", default=None, metavar="PRUNED_DIR",
                        help="only measure the peak RSS of one full + KL step, chunked and whole")
    parser.add_argument("--kl-chunk", type=int, default=None, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    if args.measure_memory:
        Path(args.output).write_text(json.dumps(measure_memory(args.measure_memory, args.block_size)))
        return
    if args.kl_memory:
        kl_memory_table(args)
        return
    configs = parse_configs(args.configs)
    labels = [p.strip() for p in args.patterns.split(",") if p.strip()]
    if any(label not in PATTERNS for label in labels):
        raise SystemExit(f"--patterns: choose from {', '.join(PATTERNS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-heal-compare-"))
    work.mkdir(parents=True, exist_ok=True)

    dense = evaluate_ppl(args.model, args, work, "dense", reuse=True)
    print(f"dense {args.model}: ppl {dense['ppl']}", flush=True)
    given = {"50%": args.pruned_50, "2:4": args.pruned_24}
    results = {}
    for label in labels:
        pruned = Path(given[label]) if given[label] else prune(args, PATTERNS[label], work)
        results[label] = compare_pattern(label, pruned, dense["ppl"], configs, args, work)
    memory = memory_row(Path(next(iter(results.values()))["pruned_dir"]), args, work) if results else None
    rows = [row for res in results.values() for row in res["rows"]]
    pruned_ppl = ", ".join(f"{k} {v['pruned_ppl']}" for k, v in results.items())
    budget = f"{args.steps} steps x {args.block_size} tokens"
    print(f"\ndense ppl {dense['ppl']}; pruned ppl {pruned_ppl}; budget {budget}")
    columns = ["pattern", "config", "ppl", "gap_closed_pct", "tokens_per_second", "cpu_s_per_ktok",
               "peak_rss_mb", "train_s", "mask_violations"]
    print_table([{k: "-" if v is None else v for k, v in row.items()} for row in rows], columns)
    if memory:
        print(f"full fine-tuning memory: {memory['bytes_per_trainable_total']} B per trainable parameter "
              f"({memory['bytes_per_trainable']}); peak RSS {memory['peak_rss_mb']} MiB = "
              f"{memory['peak_rss_bytes_per_parameter']} B per parameter ({memory['parameters']} parameters, "
              f"{memory['trainable']} trainable, block {memory['block_size']})")
    for label, res in results.items():
        if res["not_run"]:
            print(f"{label}: not run yet: {', '.join(res['not_run'])}")
        if res["target"]:
            t = res["target"]
            print(f"{label}: best distilled {t['best_distilled']} closes {t['best_gap_closed']:.3f} of the "
                  f"gap, {t['ratio']:.2f}x the default LoRA's {t['lora_default_gap_closed']:.3f} "
                  f"(target >= 2x: {'met' if t['met'] else 'not met'})")
    write_json(Path(args.output), {"settings": vars(args), "configs": {n: CONFIGS[n] for n in configs},
                                   "machine": machine(), "dense": dense, "patterns": results, "rows": rows,
                                   "full_memory": memory})


if __name__ == "__main__":
    main()
