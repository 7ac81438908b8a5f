"""Pruning benchmark on smollm2-135m: time, peak RSS and perplexity for every method x pattern.

Also measures (1) batched calibration against the same computation run one sample at a time and
(2) evaluation throughput against a bare forward pass over the same windows.

    python benchmarks/prune.py                      # full run (about an hour on 2 CPU cores)
    python benchmarks/prune.py --methods wanda --patterns unstructured --eval-windows 4

Each prune and evaluation runs in its own process so peak RSS is that process's alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]


def prune_and_eval(
    model: str, method: str, pattern: str, args, work: Path, batch: int, evaluate: bool
) -> dict:
    out = work / f"{method}-{pattern.replace(':', 'of')}-b{batch}"
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
    run = run_measured(cmd, log=work / f"{out.name}.log")
    record = json.loads((out / "sparseheal.json").read_text())
    row = {
        "method": method,
        "pattern": pattern,
        "batch": batch,
        "prune_s": record["timings"]["prune"],
        "total_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
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
    ]
    run = run_measured(cmd, log=work / "eval.log")
    res = json.loads(result.read_text())["results"][0]
    return {
        "ppl": round(res["ppl"], 3),
        "eval_tok_s": res["tokens_per_second"],
        "eval_rss_mb": run["peak_rss_mb"],
    }


def eval_overhead(model: str, windows: int) -> dict:
    """Tokens/s of sparseheal's perplexity loop vs a bare ``model(input_ids)`` loop on the same windows."""
    import torch

    from sparseheal.data import eval_tokens
    from sparseheal.evaluate.perplexity import perplexity
    from sparseheal.models import load_model

    lm, tokenizer, _ = load_model(model)
    tokens = eval_tokens("wikitext2", tokenizer, 1024)
    batches = tokens[0, : windows * 1024].reshape(windows, 1024)
    with torch.no_grad():
        lm(input_ids=batches[:1])  # warm-up
        start = time.perf_counter()
        for i in range(windows):
            lm(input_ids=batches[i : i + 1])
        bare = time.perf_counter() - start
    ours = perplexity(lm, tokens, "wikitext2", 1024, max_windows=windows).seconds
    return {
        "windows": windows,
        "bare_forward_tok_s": round(windows * 1024 / bare, 1),
        "perplexity_tok_s": round(windows * 1024 / ours, 1),
        "overhead_pct": round(100 * (ours / bare - 1), 2),
    }


def model_fp32_mb(model: str) -> float:
    """Size of the model's unique parameters in float32, MiB."""
    from sparseheal.models import load_model

    lm, _, _ = load_model(model)
    unique = {p.data_ptr(): p.numel() for p in lm.parameters()}
    return round(sum(unique.values()) * 4 / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="wanda,sparsegpt,magnitude")
    parser.add_argument("--patterns", default="unstructured,2:4,4:8")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size of the batched runs")
    parser.add_argument(
        "--sequential", default="wanda,sparsegpt", help="methods also run one sample at a time"
    )
    parser.add_argument(
        "--memory-batches", default="4", help="extra wanda batch sizes (prune only, for peak RSS)"
    )
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--overhead-windows", type=int, default=8)
    parser.add_argument("--output", default="bench_results/prune.json")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    rows = [{"method": "dense", "pattern": "-", **evaluate_ppl(args.model, args, work)}]
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            rows.append(prune_and_eval(args.model, method, pattern, args, work, args.batch, evaluate=True))
            print(rows[-1], flush=True)
    speed = []
    for method in filter(None, args.sequential.split(",")):
        batched = next(r for r in rows if r["method"] == method and r["pattern"] == "unstructured")
        single = prune_and_eval(args.model, method, "unstructured", args, work, 1, evaluate=False)
        speed.append(
            {
                "method": method,
                "batched_s": batched["prune_s"],
                "one_at_a_time_s": single["prune_s"],
                "speedup": round(single["prune_s"] / batched["prune_s"], 2),
                "batched_cpu_s": batched["cpu_s"],
                "one_at_a_time_cpu_s": single["cpu_s"],
                "cpu_speedup": round(single["cpu_s"] / batched["cpu_s"], 2),
                "batched_rss_mb": batched["peak_rss_mb"],
                "one_at_a_time_rss_mb": single["peak_rss_mb"],
            }
        )
    for batch in [int(b) for b in filter(None, args.memory_batches.split(","))]:
        row = prune_and_eval(args.model, "wanda", "unstructured", args, work, batch, evaluate=False)
        speed.append(
            {
                "method": f"wanda (batch {batch})",
                "batched_s": row["prune_s"],
                "batched_rss_mb": row["peak_rss_mb"],
            }
        )
    overhead = eval_overhead(args.model, args.overhead_windows)
    print_table(rows, ["method", "pattern", "prune_s", "peak_rss_mb", "sparsity", "ppl", "eval_tok_s"])
    print_table(
        speed,
        [
            "method",
            "batched_s",
            "one_at_a_time_s",
            "speedup",
            "batched_cpu_s",
            "one_at_a_time_cpu_s",
            "cpu_speedup",
            "batched_rss_mb",
            "one_at_a_time_rss_mb",
        ],
    )
    print_table([overhead], list(overhead))
    fp32_mb = model_fp32_mb(args.model)
    print(f"model fp32 size: {fp32_mb:.0f} MiB; target peak RSS < {2 * fp32_mb:.0f} MiB")
    write_json(
        Path(args.output),
        {
            "settings": vars(args),
            "machine": machine(),
            "model_fp32_mb": fp32_mb,
            "rows": rows,
            "batched_vs_one_at_a_time": speed,
            "eval_overhead": overhead,
        },
    )


if __name__ == "__main__":
    main()
