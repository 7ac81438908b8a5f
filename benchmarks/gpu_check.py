"""GPU check: prune and heal smollm2-135m on a CUDA device, and 2:4 semi-structured linears against dense.

Prepared for a short session on a lent GPU machine (one command, about 10 minutes on an H100/H200):

    python benchmarks/gpu_check.py --workdir /tmp/gpu_check --output bench_results/gpu_check.json

1. ``sparseheal prune`` (Wanda 2:4, 64 x 1024 calibration tokens), ``heal`` (LoRA default recipe, and
   full + KL, ``--steps`` x 1024 tokens each, ``--bf16``) and ``evaluate`` (WikiText-2, seqlen 1024, 32
   windows) on ``cuda``, each in its own process: wall time, tokens/s and perplexity.
2. ``torch.sparse.to_sparse_semi_structured``: for the 2:4-pruned linears' shapes of the model and for
   4096-wide shapes (LLaMA-2-7B's), the time of ``F.linear(x, W)`` with W converted against the dense
   matmul in float16 at ``--tokens`` rows of x, and the largest difference of the outputs. A speed-up
   above 1 with outputs equal within float16 rounding is the evidence an export format would need.

Without CUDA it says so and exits (nothing to measure on a CPU: the semi-structured kernels are CUDA-only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of smollm2-135m's linears
WIDE_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # LLaMA-2-7B


def pipeline(args, work: Path) -> list[dict]:
    """Prune, heal twice and evaluate on cuda; one row per step."""
    pruned, rows = work / "pruned-2of4", []
    steps = {
        "prune wanda 2:4": PY + ["prune", args.model, "-o", str(pruned), "--method", "wanda", "--pattern",
                                 "2:4", "--nsamples", "64", "--seqlen", "1024", "--device", "cuda",
                                 "--overwrite"],
        "evaluate pruned": PY + ["evaluate", str(pruned), "--device", "cuda", "--seqlen", "1024",
                                 "--max-windows", "32", "-o", str(work / "eval-pruned.json")],
    }
    budget = ["--max-steps", str(args.steps), "--block-size", "1024", "--max-eval-samples", "0",
              "--device", "cuda", "--bf16", "--overwrite"]
    heals = {"lora": ["--method", "lora"], "full-kl": ["--method", "full", "--distill", "kl"]}
    for name, extra in heals.items():
        steps[f"heal {name}"] = PY + ["heal", str(pruned), "-o", str(work / name), *budget, *extra]
    for name, cmd in steps.items():
        run = run_measured(cmd, log=work / f"{name.replace(' ', '_').replace(':', 'of')}.log")
        row = {"step": name, "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"]}
        if name.startswith("heal"):
            record = json.loads((work / name.split()[1] / "sparseheal.json").read_text())
            row["tokens_per_second"] = record["tokens_per_second"]
        if name.startswith("evaluate"):
            row["ppl"] = round(json.loads((work / "eval-pruned.json").read_text())["results"][0]["ppl"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def time_cuda(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs, after warm-up, timed with CUDA events."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def semi_structured(tokens: int, repeats: int) -> list[dict]:
    """Dense vs semi-structured 2:4 ``F.linear`` at each shape, float16."""
    import torch
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    from sparseheal.sparsity.masks import nm_mask

    rows = []
    for out_f, in_f in MODEL_SHAPES + WIDE_SHAPES:
        weight = torch.randn(out_f, in_f, device="cuda", dtype=torch.float16)  # (out, in)
        weight = weight * nm_mask(weight.abs().float(), 2, 4).to(weight.dtype)  # keep 2 of every 4
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.float16)  # (T, in)
        row = {"shape": f"{out_f}x{in_f}", "tokens": tokens}
        try:
            sparse = to_sparse_semi_structured(weight)
            dense_ms = time_cuda(lambda: F.linear(x, weight), repeats)  # noqa: B023
            sparse_ms = time_cuda(lambda: F.linear(x, sparse), repeats)  # noqa: B023
            error = (F.linear(x, sparse) - F.linear(x, weight)).abs().max().item()
            row.update(dense_ms=round(dense_ms, 4), sparse_ms=round(sparse_ms, 4),
                       speedup=round(dense_ms / sparse_ms, 3), max_abs_diff=error,
                       backend=type(sparse).__name__)
        except (RuntimeError, ValueError, NotImplementedError) as err:  # unsupported shape or GPU
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=100, help="heal steps of 1024 tokens")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of x in the matmul comparison")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-pipeline", action="store_true", help="only the matmul comparison")
    parser.add_argument("--output", default="bench_results/gpu_check.json")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure here (run this on a GPU machine)")
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    matmuls = semi_structured(args.tokens, args.repeats)
    steps = [] if args.skip_pipeline else pipeline(args, work)
    if steps:
        print_table(steps, ["step", "wall_s", "peak_rss_mb", "tokens_per_second", "ppl"])
    print_table(matmuls, ["shape", "tokens", "dense_ms", "sparse_ms", "speedup", "max_abs_diff", "backend",
                          "error"])
    write_json(Path(args.output), {"settings": vars(args), "machine": machine(),
                                   "device": torch.cuda.get_device_name(0), "pipeline": steps,
                                   "semi_structured": matmuls})


if __name__ == "__main__":
    main()
