"""Pruning benchmark on smollm2-135m: time, peak RSS and perplexity for every method x pattern.

Also measures, in the same run: (1) the compute floor of the prune (``_floor.py``: the matrix products
the algorithm needs, timed on this machine at the layer's own shapes; for magnitude, its selection) right
before and right after every prune, and each prune's wall time as a ratio to the mean of the two (the
machine's rate drifts, so the range over the two is given too); (2) with ``--baseline-rev REV``, the
same prunes with the code of an earlier git revision, its wall time and whether its masks and weights
are bit-identical; (3) batched calibration against the same computation run one sample at a time (the
reference code's loop); (4) evaluation throughput against a bare forward pass over the same windows,
alternating, 3 runs each.

    python benchmarks/prune.py                      # full run (about an hour on 2 CPU cores)
    python benchmarks/prune.py --methods wanda --patterns unstructured --eval-windows 4
    python benchmarks/prune.py --methods wanda,sparsegpt --patterns unstructured --baseline-rev be24021

Each prune and evaluation runs in its own process so peak RSS is that process's alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_measured, write_json  # noqa: E402
from _floor import magnitude_floor, paired_prune, prune_floor  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
ROOT = Path(__file__).resolve().parents[1]


def baseline_checkout(rev: str, work: Path) -> dict:
    """A detached worktree of ``rev``; its ``src`` goes first on PYTHONPATH for the baseline prunes."""
    tree = work / f"baseline-{rev}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)
    return {"PYTHONPATH": str(tree / "src")}


def same_outputs(a: Path, b: Path) -> bool:
    """Whether two prune outputs hold bit-identical weights and masks."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "sparsity_masks.safetensors"):
        left, right = load_file(a / name), load_file(b / name)
        if left.keys() != right.keys() or any(not left[k].equal(right[k]) for k in left):
            return False
    return True


def prune_and_eval(
    model: str, method: str, pattern: str, args, work: Path, batch: int, evaluate: bool,
    env: dict | None = None, tag: str = "",
) -> dict:
    out = work / f"{method}-{pattern.replace(':', 'of')}-b{batch}{tag}"
    cmd = PY + [
        "prune",
        model,
        "-o",
        str(out),
        "--method",
        method,
        "--pattern",
        pattern,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--calibration-batch-size",
        str(batch),
        "--overwrite",
    ]
    run = run_measured(cmd, env=env, log=work / f"{out.name}.log")
    record = json.loads((out / "sparseheal.json").read_text())
    row = {
        "method": method,
        "pattern": pattern,
        "batch": batch,
        "prune_s": record["timings"]["prune"],
        "total_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "sys_s": run["sys_s"],
        "minor_faults": run["minor_faults"],
        "peak_rss_mb": run["peak_rss_mb"],
        "sparsity": record["sparsity_achieved"],
    }
    if evaluate:
        row.update(evaluate_ppl(str(out), args, work))
    return row


def evaluate_ppl(model: str, args, work: Path) -> dict:
    result = work / "eval.json"
    cmd = PY + [
        "evaluate",
        model,
        "--seqlen",
        "1024",
        "--max-windows",
        str(args.eval_windows),
        "-o",
        str(result),
        "--overwrite",
    ]
    run = run_measured(cmd, log=work / "eval.log")
    res = json.loads(result.read_text())["results"][0]
    return {
        "ppl": round(res["ppl"], 3),
        "eval_tok_s": res["tokens_per_second"],
        "eval_rss_mb": run["peak_rss_mb"],
    }


def eval_overhead(model: str, windows: int, repeats: int = 3) -> dict:
    """Tokens/s of sparseheal's perplexity loop against a bare ``model(input_ids)`` loop on the same windows,
    run alternately ``repeats`` times each (medians, and the spread of the ratio)."""
    import torch

    from sparseheal.data import eval_tokens
    from sparseheal.evaluate.perplexity import perplexity
    from sparseheal.models import load_model

    lm, tokenizer, _ = load_model(model)
    tokens = eval_tokens("wikitext2", tokenizer, 1024)
    batches = tokens[0, : windows * 1024].reshape(windows, 1024)
    bare, ours = [], []
    with torch.no_grad():
        lm(input_ids=batches[:1])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(windows):
                lm(input_ids=batches[i : i + 1])
            bare.append(time.perf_counter() - start)
            ours.append(perplexity(lm, tokens, "wikitext2", 1024, max_windows=windows).seconds)
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    return {
        "windows": windows,
        "runs": repeats,
        "bare_forward_tok_s": round(windows * 1024 / statistics.median(bare), 1),
        "perplexity_tok_s": round(windows * 1024 / statistics.median(ours), 1),
        "x_bare": round(statistics.median(ratios), 3),
        "x_bare_range": f"{min(ratios):.3f}-{max(ratios):.3f}",
    }


def in_child(kind: str, args, work: Path, dirs: list[str] | None = None, method: str = "") -> dict:
    """Runs an in-process measurement in a child process, so that this process never holds a model: a
    child forked from a large parent reports the parent's size as its own peak RSS (Linux keeps the
    larger of the two at exec)."""
    out = work / f"{kind}{method}.child.json"
    cmd = [sys.executable, __file__, "--child", kind, "--child-out", str(out), "--model", args.model,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch", str(args.batch),
           "--overhead-windows", str(args.overhead_windows), "--child-method", method,
           "--methods", args.methods, *(["--child-dirs", *dirs] if dirs else [])]
    run = run_measured(cmd, log=work / f"{kind}{method}.child.log")
    return {**json.loads(out.read_text()), "child_peak_rss_mb": run["peak_rss_mb"]}


def child(args) -> None:
    if args.child == "floor":
        row = {**prune_floor(args.model, args.nsamples, args.seqlen, args.batch),
               **(magnitude_floor(args.model) if "magnitude" in args.methods.split(",") else {}),
               "model_fp32_mb": model_fp32_mb(args.model)}
    elif args.child == "paired":  # the prune in the child, the floor's kernels after each layer
        row = paired_prune(args.model, args.child_method, args.nsamples, args.seqlen, args.batch,
                           str(Path(args.child_out).parent / f"paired-{args.child_method}"))
    elif args.child == "identical":  # both outputs loaded here, not in the parent
        row = {"identical": same_outputs(*(Path(d) for d in args.child_dirs))}
    else:
        row = eval_overhead(args.model, args.overhead_windows)
    Path(args.child_out).write_text(json.dumps(row))


def model_fp32_mb(model: str) -> float:
    """Size of the model's unique parameters in float32, MiB."""
    from sparseheal.models import load_model

    lm, _, _ = load_model(model)
    unique = {p.data_ptr(): p.numel() for p in lm.parameters()}
    return round(sum(unique.values()) * 4 / 2**20, 1)


def plan(args) -> list[tuple]:
    """Jobs in priority order, so a run cut short still holds the most informative rows."""
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    grid = [("prune", m, p, args.batch) for p in patterns for m in methods]
    cheap = [job for job in grid if job[1] == "magnitude"]
    first = [job for job in grid if job[2] == "unstructured" and job[1] != "magnitude"]
    rest = [job for job in grid if job not in cheap and job not in first]
    def base(prunes: list[tuple]) -> list[tuple]:  # each baseline after the prune it is compared with
        return [("baseline", m, p, args.batch) for _, m, p, _ in prunes
                if args.baseline_rev and p in args.baseline_patterns.split(",")]

    single = [("single", m, "unstructured", 1) for m in filter(None, args.sequential.split(","))]
    memory = [
        ("memory", "wanda", "unstructured", int(b)) for b in filter(None, args.memory_batches.split(","))
    ]
    paired = [("paired", m) for m in filter(None, args.paired.split(","))]
    early = base(first + cheap[:1])  # the baselines of prunes that run early; the others' after them
    jobs = (first[:1] + early[:1] + cheap[:1] + first[1:] + early[1:] + single[:1] + cheap[1:] + rest
            + base(cheap[1:] + rest) + memory + paired
            + ([("overhead",), ("dense",)] if args.eval_windows else []) + single[1:])
    timed = [job for job in jobs if job[0] in ("prune", "baseline")]  # each one between two floors
    planned = [("floor", 0)]
    for job in jobs:
        planned.append(job)
        if job in timed:
            planned.append(("floor", timed.index(job) + 1))
    return planned


def run_job(job: tuple, args, work: Path) -> dict:
    """Runs one job, or reuses its saved result from an earlier (interrupted) run in the same workdir."""
    saved = work / ("-".join(map(str, job)).replace(":", "of") + ".result.json")
    if saved.is_file():
        return json.loads(saved.read_text())
    kind = job[0]
    if kind in ("prune", "single", "memory"):
        row = {"job": kind, **prune_and_eval(args.model, job[1], job[2], args, work, job[3],
                                                 kind == "prune" and args.eval_windows > 0)}
    elif kind == "baseline":
        env = baseline_checkout(args.baseline_rev, work)
        row = {"job": kind,
               **prune_and_eval(args.model, job[1], job[2], args, work, job[3], False, env, "-base")}
        ours = work / f"{job[1]}-{job[2].replace(':', 'of')}-b{job[3]}"
        row["identical"] = in_child("identical", args, work, [str(ours), str(work / f"{ours.name}-base")])[
            "identical"]
    elif kind in ("floor", "overhead"):
        row = {"job": kind, **in_child(kind, args, work)}
    elif kind == "paired":
        row = {"job": kind, **in_child(kind, args, work, method=job[1])}
    else:
        row = {"job": kind, "method": "dense", "pattern": "-", **evaluate_ppl(args.model, args, work)}
    saved.write_text(json.dumps(row))
    return row


def _bracket(rows: list[dict], position: int) -> list[dict]:
    """The floor measured last before ``rows[position]`` and first after it (those that exist)."""
    before = [r for r in rows[:position] if r["job"] == "floor"][-1:]
    after = [r for r in rows[position + 1:] if r["job"] == "floor"][:1]
    return before + after


def _floor_ratio(row: dict, floors: list[dict]) -> dict:
    """A prune's wall time over the mean of its bracketing floors, and over each of them."""
    key = {"sparsegpt": "sparsegpt_floor_s", "magnitude": "magnitude_floor_s"}.get(row["method"], "floor_s")
    own = [f[key] for f in floors if key in f]
    if not own:
        return {}
    mean = statistics.mean(own)
    ratios = {"floor_s": round(mean, 2), "x_floor": round(row["prune_s"] / mean, 3),
              "x_floor_range": f"{row['prune_s'] / max(own):.3f}-{row['prune_s'] / min(own):.3f}"}
    bare_key = "magnitude_bare_s" if row["method"] == "magnitude" else "bare_passes_s"
    bare = [f[bare_key] for f in floors if bare_key in f]
    if bare:  # what the driver adds to the model's own two passes (magnitude: to its bare selection)
        ratios["x_bare_passes"] = round(row["prune_s"] / statistics.mean(bare), 3)
    return ratios


def _with_ratios(rows: list[dict]) -> list[dict]:
    """The prune rows with their ratio to the floor and to the baseline revision's run of the same prune."""
    table = []
    for position, row in enumerate(rows):
        if row["job"] not in ("dense", "prune"):
            continue
        row = dict(row)
        if row["job"] == "prune":
            row.update(_floor_ratio(row, _bracket(rows, position)))
        base = next((b for b in rows if b["job"] == "baseline" and (b["method"], b["pattern"]) ==
                     (row["method"], row["pattern"])), None)
        if base:
            row.update(baseline_s=base["prune_s"], speedup=round(base["prune_s"] / row["prune_s"], 3),
                       identical=base["identical"], baseline_faults=base.get("minor_faults"),
                       baseline_sys_s=base.get("sys_s"), baseline_cpu_s=base.get("cpu_s"),
                       baseline_peak_rss_mb=base.get("peak_rss_mb"))
            base_floors = _floor_ratio(base, _bracket(rows, rows.index(base)))
            if base_floors:
                row["baseline_x_floor"] = base_floors["x_floor"]
        table.append(row)
    for row in table:  # SparseGPT's target is a multiple of Wanda's wall time in the same run
        wanda = next((r for r in table if r["method"] == "wanda" and r["pattern"] == row["pattern"]), None)
        if row["method"] == "sparsegpt" and wanda:
            row["x_wanda"] = round(row["prune_s"] / wanda["prune_s"], 3)
    return table


def summarize(rows: list[dict], args, fp32_mb: float) -> dict:
    table = _with_ratios(rows)
    speed = []
    for single in (r for r in rows if r["job"] == "single"):
        batched = next(
            (r for r in table if r["method"] == single["method"] and r["pattern"] == "unstructured"), None
        )
        if batched:
            speed.append(
                {
                    "method": single["method"],
                    "batched_s": batched["prune_s"],
                    "one_at_a_time_s": single["prune_s"],
                    "speedup": round(single["prune_s"] / batched["prune_s"], 2),
                    "batched_cpu_s": batched["cpu_s"],
                    "one_at_a_time_cpu_s": single["cpu_s"],
                    "cpu_speedup": round(single["cpu_s"] / batched["cpu_s"], 2),
                }
            )
    memory = [
        {
            "batch": r["batch"],
            "prune_s": r["prune_s"],
            "cpu_s": r["cpu_s"],
            "peak_rss_mb": r["peak_rss_mb"],
            "x_fp32_size": round(r["peak_rss_mb"] / fp32_mb, 2) if fp32_mb else None,
        }
        for r in rows
        if r["job"] in ("prune", "memory", "single")
        and r["method"] == "wanda"
        and r["pattern"] == "unstructured"
    ]
    overhead = [r for r in rows if r["job"] == "overhead"]
    paired = {r["method"]: r for r in rows if r["job"] == "paired"}
    if {"wanda", "sparsegpt"} <= paired.keys():  # each prune over the products' floor of its own run
        ratio = [paired[m]["prune_s"] / paired[m]["floor_s"] for m in ("sparsegpt", "wanda")]
        paired["sparsegpt"]["drift_matched_x_wanda"] = round(ratio[0] / ratio[1], 3)
    return {
        "settings": vars(args),
        "machine": machine(),
        "model_fp32_mb": fp32_mb,
        "floors": [r for r in rows if r["job"] == "floor"],
        "paired": [r for r in rows if r["job"] == "paired"],
        "rows": table,
        "batched_vs_one_at_a_time": speed,
        "memory_by_batch": memory,
        "eval_overhead": overhead,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    parser.add_argument("--patterns", default="unstructured,2:4,4:8")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="calibration batch size of the batched runs")
    parser.add_argument(
        "--sequential", default="wanda,sparsegpt", help="methods also run one sample at a time"
    )
    parser.add_argument("--memory-batches", default="8", help="extra wanda batch sizes (prune only)")
    parser.add_argument("--paired", default="wanda,sparsegpt", help="methods also pruned in one process with "
                        "the floor's kernels timed after every layer (the drift-matched ratio)")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose prunes are timed alongside "
                                                             "and compared bit for bit")
    parser.add_argument("--baseline-patterns", default="unstructured", help="patterns run with the baseline")
    parser.add_argument("--eval-windows", type=int, default=32, help="0: no perplexity, no evaluation rows")
    parser.add_argument("--overhead-windows", type=int, default=8)
    parser.add_argument("--output", default="benchmarks/results/prune.json")
    parser.add_argument("--workdir", default=None, help="reuse it to resume an interrupted run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-dirs", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-method", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    fp32_mb = 0.0
    rows = []
    for job in plan(args):
        rows.append(run_job(job, args, work))
        fp32_mb = rows[-1].get("model_fp32_mb", fp32_mb)
        print(rows[-1], flush=True)
        write_json(Path(args.output), summarize(rows, args, fp32_mb))
    result = summarize(rows, args, fp32_mb)
    print_table(result["floors"], ["batch", "tflop", "linear_gflop_s", "attention_gflop_s", "floor_s",
                                   "bare_passes_s", "hessian_tflop", "sparsegpt_floor_s",
                                   "magnitude_floor_s", "magnitude_bare_s"])
    print_table(result["paired"], ["method", "prune_s", "floor_s", "sparsegpt_floor_s", "bare_passes_s",
                                   "x_floor", "x_bare_passes", "bare_x_floor", "drift_matched_x_wanda",
                                   "probe_s", "child_peak_rss_mb"])
    print_table(result["rows"], ["method", "pattern", "prune_s", "floor_s", "x_floor", "x_floor_range",
                                 "x_bare_passes", "x_wanda", "baseline_s", "baseline_x_floor",
                                 "speedup", "identical", "cpu_s", "sys_s", "minor_faults", "baseline_faults",
                                 "peak_rss_mb", "sparsity", "ppl"])
    print_table(
        result["batched_vs_one_at_a_time"],
        [
            "method",
            "batched_s",
            "one_at_a_time_s",
            "speedup",
            "batched_cpu_s",
            "one_at_a_time_cpu_s",
            "cpu_speedup",
        ],
    )
    print_table(result["memory_by_batch"], ["batch", "prune_s", "cpu_s", "peak_rss_mb", "x_fp32_size"])
    print_table(
        result["eval_overhead"], ["windows", "runs", "bare_forward_tok_s", "perplexity_tok_s", "x_bare",
                                  "x_bare_range"]
    )
    print(f"model fp32 size: {fp32_mb:.0f} MiB; peak RSS target < {2 * fp32_mb:.0f} MiB")


if __name__ == "__main__":
    main()
