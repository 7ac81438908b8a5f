"""OWL against uniform layer sparsity: Wanda on smollm2-135m at one or more targets, same calibration draw.

For each target sparsity: ``sparseheal prune`` with ``--layer-sparsity uniform`` and ``owl`` (each in its
own process: wall time, CPU time, peak RSS), then WikiText-2 perplexity (seqlen 1024, first
``--eval-windows`` windows) of both, and the cost of OWL's extra dense statistics pass as the record
times it (``timings.owl_statistics`` against ``timings.prune``).

Run: ``python benchmarks/owl.py --sparsity 0.7 [--workdir DIR]`` (finished prunes in DIR are reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import machine, perplexity, print_table, run_measured, write_json

PY = [sys.executable, "-m", "sparseheal"]


def prune(model: str, out: Path, sparsity: float, spread: str, nsamples: int, seqlen: int, m: float,
          lam: float) -> dict:
    """Prunes once (reusing a finished output); returns the measured process and the record's timings."""
    run_file = out.parent / f"{out.name}.run.json"
    finished = (out / "sparseheal.json").is_file() and run_file.is_file()
    measured = json.loads(run_file.read_text()) if finished else None
    if measured is None:
        cmd = PY + ["prune", model, "-o", str(out), "--method", "wanda", "--sparsity", str(sparsity),
                    "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--layer-sparsity", spread,
                    "--owl-m", str(m), "--owl-lambda", str(lam), "--overwrite"]
        measured = run_measured(cmd, log=out.parent / f"{out.name}.log")
        run_file.write_text(json.dumps(measured))
    record = json.loads((out / "sparseheal.json").read_text())
    return {**measured, "timings": record["timings"], "achieved": record["sparsity_achieved"],
            "layer_sparsity": record["layer_sparsity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.7])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--owl-m", type=float, default=5.0)
    parser.add_argument("--owl-lambda", type=float, default=0.08)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "owl.json"))
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-owl-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for sparsity in args.sparsity:
        for spread in ("uniform", "owl"):
            out = work / f"wanda-{int(round(100 * sparsity))}-{spread}"
            run = prune(args.model, out, sparsity, spread, args.nsamples, args.seqlen, args.owl_m,
                        args.owl_lambda)
            ppl = perplexity(str(out), out.with_suffix(".eval.json"), args.eval_windows, reuse=True)["ppl"]
            stats = run["timings"].get("owl_statistics")
            rows.append({"sparsity": sparsity, "layer_sparsity": spread, "ppl": round(ppl, 3),
                         "achieved": run["achieved"], "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                         "peak_rss_mb": run["peak_rss_mb"], "prune_s": run["timings"]["prune"],
                         "owl_statistics_s": stats,
                         "statistics_share_of_prune":
                             round(stats / run["timings"]["prune"], 3) if stats else None,
                         "layer_sparsities": run["layer_sparsity"].get("sparsities")})
        uniform, owl = rows[-2]["ppl"], rows[-1]["ppl"]
        rows[-1]["ppl_change_vs_uniform"] = f"{100 * (owl - uniform) / uniform:+.1f}%"
    print_table(rows, ["sparsity", "layer_sparsity", "ppl", "ppl_change_vs_uniform", "achieved", "wall_s",
                       "cpu_s", "peak_rss_mb", "prune_s", "owl_statistics_s"])
    write_json(Path(args.output), {"machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
