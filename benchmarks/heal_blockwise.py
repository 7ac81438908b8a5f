"""Block-wise reconstruction against full fine-tuning where one-shot pruning collapses (smollm2-135m).

Same protocol as the README's healing table: Wanda with 64 x 1024 C4 tokens (seed 0), WikiText-2
perplexity at seqlen 1024 over the first ``--eval-windows`` windows, float32, batch 1. For each pruned
model given (``--pruned NAME=DIR``, e.g. from ``benchmarks/owl.py``'s work directory) the rows are:

- ``pruned``: the pruned model itself;
- ``blockwise``: ``heal --method blockwise`` (``--bw-epochs``, ``--bw-lr``, ``--bw-nsamples`` samples of
  1024 tokens, the prune's own draw when not given);
- ``full``: ``heal --method full --lr 3e-4 --warmup-steps 10 --max-steps 100 --block-size 1024``;
- ``blockwise+full``: the full heal on the blockwise output;
- ``blockwise+full@same-time``: blockwise on ``--budget-nsamples`` samples, then the full heal with as
  many steps as fit in what is left of the ``full`` row's wall time (its per-step time and fixed cost
  from that run: steps = floor((wall_full - wall_blockwise - fixed_full) / step_full)); needs the
  ``full`` row first. The row reports the two stages' total wall time and its ratio to ``full``'s.

Each heal runs in its own process (wall time, CPU time, peak RSS of that process); the share of the gap
closed is (ppl_pruned - ppl_healed) / (ppl_pruned - ppl_dense). ``--memory-model`` prints the memory
model of both healers for smollm2-135m and LLaMA-2 7B / 70B (see heal/blockwise.py).

Run: ``python benchmarks/heal_blockwise.py --pruned 70=DIR [--rows pruned,blockwise,full] --workdir W``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from _common import machine, perplexity, print_table, run_measured, write_json

PY = [sys.executable, "-m", "sparseheal"]
FULL = ["--method", "full", "--lr", "3e-4", "--warmup-steps", "10", "--max-steps", "100", "--block-size",
        "1024", "--max-eval-samples", "4", "--seed", "0"]
# (layers, width, embedding matrices (1: tied), vocab, layer parameters, all parameters), from their configs
MODELS = {"smollm2-135m": (30, 576, 1, 49152, 3_540_096, 134_515_008),
          "llama-2-7b": (32, 4096, 2, 32000, 202_383_360, 6_738_415_616),
          "llama-2-70b": (80, 8192, 2, 32000, 855_654_400, 68_976_648_192)}


RUNTIME = 394 * 2**20  # RSS of Python, torch, transformers and sparseheal's CLI once imported (measured)


def memory_model(name: str, nsamples: int, seqlen: int) -> dict:
    """Predicted peaks (GiB, float32) of block-wise and full fine-tuning: weights, gradients and AdamW
    moments, masks (1 bit per prunable weight, unpacked one layer at a time) and the two streams; the
    activations of one sample through one layer (about 20 d T floats) for block-wise. ``cpu_total`` is the
    block-wise peak when the host is the compute device: host + device - the layer counted in both +
    the runtime."""
    layers, d, embeddings, vocab, layer_p, total_p = MODELS[name]
    streams = 2 * 4 * nsamples * seqlen * d  # the dense and the sparse hidden states, on the host
    host = 4 * total_p + streams + layers * layer_p // 8  # sparse model, streams, packed masks
    device = 2 * 4 * layer_p + 12 * layer_p + layer_p + 4 * 20 * d * seqlen  # layer + twin, AdamW, mask, acts
    frozen = embeddings * vocab * d
    full = 17 * (total_p - frozen) + 4 * frozen  # 17 B per trainable parameter, embeddings frozen at 4 B
    gib = 2**30
    return {"model": name, "nsamples": nsamples, "seqlen": seqlen,
            "blockwise_host_gib": round(host / gib, 2), "blockwise_device_gib": round(device / gib, 2),
            "blockwise_streams_gib": round(streams / gib, 2),
            "blockwise_cpu_total_gib": round((host + device - 4 * layer_p + RUNTIME) / gib, 2),
            "full_gib": round(full / gib, 1), "full_cpu_total_gib": round((full + RUNTIME) / gib, 1)}


def heal(source: Path, out: Path, args: list[str]) -> dict:
    """One heal in its own process (reused when finished)."""
    run_file = out.with_suffix(".run.json")
    if (out / "sparseheal.json").is_file() and run_file.is_file():
        return json.loads(run_file.read_text())
    measured = run_measured(PY + ["heal", str(source), "-o", str(out), "--overwrite", *args],
                            log=out.with_suffix(".log"))
    run_file.write_text(json.dumps(measured))
    return measured


def budget_steps(full_run: dict, full_dir: Path, blockwise_wall: float, steps: int = 100) -> int:
    """Full-heal steps that bring blockwise + full to the full row's wall time."""
    train = json.loads((full_dir / "sparseheal.json").read_text())["timings"]["train"]
    fixed = full_run["wall_s"] - train  # load, data, save: paid again by the second stage
    return max(1, math.floor((full_run["wall_s"] - blockwise_wall - fixed) / (train / steps)))


def same_time(name: str, pruned: Path, work: Path, args, runs: dict) -> tuple[Path, dict]:
    """Blockwise on fewer samples, then full for the rest of the full row's wall time."""
    if "full" not in runs:
        raise SystemExit("blockwise+full@same-time needs the full row before it (--rows ...,full,...)")
    bw_dir = work / f"{name}-blockwise-n{args.budget_nsamples}"
    bw = heal(pruned, bw_dir, ["--method", "blockwise", "--epochs", str(args.bw_epochs),
                               "--lr", str(args.bw_lr), "--nsamples", str(args.budget_nsamples)])
    steps = budget_steps(runs["full"], work / f"{name}-full", bw["wall_s"])
    out = work / f"{name}-blockwise-n{args.budget_nsamples}-then-full-{steps}"
    full = heal(bw_dir, out, [*FULL[:FULL.index("--max-steps")], "--max-steps", str(steps),
                              *FULL[FULL.index("--max-steps") + 2:]])
    total = {k: round(bw[k] + full[k], 2) for k in ("wall_s", "cpu_s")}
    return out, {**total, "peak_rss_mb": max(bw["peak_rss_mb"], full["peak_rss_mb"]),
                 "wall_vs_full": round(total["wall_s"] / runs["full"]["wall_s"], 3),
                 "blockwise_nsamples": args.budget_nsamples, "blockwise_wall_s": bw["wall_s"],
                 "full_steps": steps, "full_wall_s": full["wall_s"]}


def rows_for(name: str, pruned: Path, work: Path, args, dense: float) -> list[dict]:
    bw_args = ["--method", "blockwise", "--epochs", str(args.bw_epochs), "--lr", str(args.bw_lr)]
    bw_args += ["--nsamples", str(args.bw_nsamples)] if args.bw_nsamples else []
    plan = {"blockwise": (pruned, bw_args), "full": (pruned, FULL),
            "blockwise+full": (work / f"{name}-blockwise", FULL)}
    rows, runs = [], {}
    base = perplexity(str(pruned), work / f"{name}-pruned.eval.json", args.eval_windows, reuse=True)["ppl"]
    for row in args.rows:
        if row == "pruned":
            rows.append({"pruned": name, "row": "pruned", "ppl": round(base, 3), "gap_closed": "0.0%"})
            continue
        if row == "blockwise+full@same-time":
            out, run = same_time(name, pruned, work, args, runs)
        else:
            source, extra = plan[row]
            out = work / f"{name}-{row.replace('+', '-then-')}"
            run = runs[row] = heal(source, out, extra)
        ppl = perplexity(str(out), out.with_suffix(".eval.json"), args.eval_windows, reuse=True)["ppl"]
        closed = (base - ppl) / (base - dense)
        rows.append({"pruned": name, "row": row, "ppl": round(ppl, 3), "gap_closed": f"{100 * closed:.1f}%",
                     **run})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", nargs="+", default=[], help="NAME=DIR of pruned models")
    parser.add_argument("--rows", default="pruned,blockwise,full,blockwise+full")
    parser.add_argument("--bw-epochs", type=float, default=1.0)
    parser.add_argument("--bw-lr", type=float, default=1e-3)
    parser.add_argument("--bw-nsamples", type=int, default=None)
    parser.add_argument("--budget-nsamples", type=int, default=16,
                        help="blockwise samples of the blockwise+full@same-time row")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--memory-model", action="store_true")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "heal_blockwise.json"))
    args = parser.parse_args()
    args.rows = args.rows.split(",")
    if args.memory_model:
        sizes = (("smollm2-135m", 64, 1024), ("llama-2-7b", 128, 2048), ("llama-2-70b", 128, 2048))
        predicted = [memory_model(m, n, t) for m, n, t in sizes]
        print_table(predicted, list(predicted[0]))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-blockwise-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = perplexity("smollm2-135m", work / "dense.eval.json", args.eval_windows, reuse=True)["ppl"]
    rows = []
    for item in args.pruned:
        name, _, path = item.partition("=")
        rows += rows_for(name, Path(path), work, args, dense)
    columns = ["pruned", "row", "ppl", "gap_closed", "wall_s", "wall_vs_full", "cpu_s", "peak_rss_mb"]
    print_table(rows, columns)
    out = Path(args.output)
    earlier = json.loads(out.read_text()).get("rows", []) if out.is_file() else []
    def key(r: dict) -> tuple:
        return r["pruned"], r["row"], r.get("blockwise_nsamples")

    keys = {key(r) for r in rows}
    merged = [r for r in earlier if key(r) not in keys] + rows
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    write_json(out, {"machine": machine(), "dense_ppl": dense, "settings": settings, "rows": merged})


if __name__ == "__main__":
    main()
