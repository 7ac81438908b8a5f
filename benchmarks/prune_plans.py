"""Hardware-shaped patterns and sparsity plans on smollm2-135m: perplexity before and after the default
full heal for all-2:4, MLP-only 2:4, attention-only 2:4, V:N:M at two ratios, 16x16 blocks at 50%, and
unstructured Wanda at each one's overall share.

Protocol: Wanda with 64 x 1024 C4 calibration tokens (seed 0); WikiText-2 perplexity at seqlen 1024 on
the first ``--eval-windows`` windows; ``heal --method full`` with its defaults for ``--steps`` x
``--block-size`` C4 tokens (batch 1; 20 x 1024 by default, a fifth of the heal comparison's budget).
Finished rows in ``--workdir`` are reused.

    python benchmarks/prune_plans.py --workdir DIR [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached, perplexity, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
PLANS = {
    "mlp-2of4": [{"family": "mlp", "pattern": "2:4"}, {"family": "attention", "skip": True}],
    "attention-2of4": [{"family": "attention", "pattern": "2:4"}, {"family": "mlp", "skip": True}],
}
CONFIGS = {  # name -> prune flags (a plan by name from PLANS)
    "all-2of4": ["--pattern", "2:4"],
    "mlp-2of4": ["plan:mlp-2of4"],
    "attention-2of4": ["plan:attention-2of4"],
    "vnm-64-2-6": ["--pattern", "64:2:6"],
    "vnm-64-2-8": ["--pattern", "64:2:8"],
    "block-16x16-50": ["--pattern", "block:16x16", "--sparsity", "0.5"],
}


def _flags(name: str, work: Path) -> list[str]:
    flags = CONFIGS[name]
    if flags and flags[0].startswith("plan:"):
        path = work / f"{flags[0][5:]}.yaml"
        path.write_text(json.dumps({"rules": PLANS[flags[0][5:]]}))
        return ["--plan", str(path)]
    return flags


def row(label: str, flags: list[str], args, work: Path) -> dict:
    """Prune, evaluate, heal, evaluate one configuration."""
    out = work / label
    cmd = PY + ["prune", args.model, "-o", str(out), "--method", "wanda", "--nsamples", str(args.nsamples),
                "--seqlen", str(args.calib_seqlen), "--overwrite", *flags]
    cached(work / f"{label}.run.json", lambda: run_measured(cmd, log=work / f"{label}.log"))
    record = json.loads((out / "sparseheal.json").read_text())
    dense = ((record.get("plan") or {}).get("dense") or {}).get("parameters", 0)
    weights = record["prunable_parameters"] + dense
    share = record["pruned_parameters"] / weights  # of every linear weight in the decoder layers
    ppl = perplexity(str(out), work / f"{label}.eval.json", args.eval_windows, reuse=True)["ppl"]
    healed = work / f"healed-{label}"
    heal = PY + ["heal", str(out), "-o", str(healed), "--method", "full", "--max-steps", str(args.steps),
                 "--block-size", str(args.block_size), "--batch-size", "1", "--gradient-accumulation", "1",
                 "--max-eval-samples", "0", "--data", "c4", "--overwrite"]
    cached(work / f"{healed.name}.run.json", lambda: run_measured(heal, log=work / f"{healed.name}.log"))
    after = perplexity(str(healed), work / f"{healed.name}.eval.json", args.eval_windows, reuse=True)["ppl"]
    ok = cached(work / f"{healed.name}.inspect.json", lambda: {"ok": _inspect(healed)})["ok"]
    return {"config": label, "share": round(share, 4), "ppl": round(ppl, 3), "healed_ppl": round(after, 3),
            "healed_inspect_ok": ok}


def _inspect(directory: Path) -> bool:
    import subprocess

    return subprocess.run(PY + ["inspect", str(directory)], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "prune_plans.json"))
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-plans-"))
    work.mkdir(parents=True, exist_ok=True)
    dense = perplexity(args.model, work / "dense.eval.json", args.eval_windows, reuse=True)["ppl"]
    rows, flat = [], {}
    for name in args.configs.split(","):
        shaped = row(name, _flags(name, work), args, work)
        share = f"{shaped['share']:.4f}"
        if share not in flat:  # unstructured Wanda at the same share of the decoder layers' weights
            flat[share] = row(f"unstructured-{share}", ["--sparsity", share], args, work)
        rows += [shaped, {**flat[share], "compared_with": name}]
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
        write_json(Path(args.output), {"settings": {k: v for k, v in vars(args).items() if k != "output"},
                                       "dense_ppl": round(dense, 3), "rows": rows})
    print(f"dense perplexity {dense:.3f}")
    print_table(rows, ["config", "share", "ppl", "healed_ppl", "healed_inspect_ok"])


if __name__ == "__main__":
    main()
