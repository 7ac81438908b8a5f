"""Every pruning method on smollm2-135m at 50%, 2:4 and 70%, with and without DSnoT, then the default full
heal of the best three: the project's protocol.

Protocol: calibration 64 x 1024 C4 tokens (seed 0); WikiText-2 perplexity at seqlen 1024 on the first
``--eval-windows`` windows; each prune in its own process (wall time, CPU time, peak RSS of that process);
healing with ``heal --method full`` and its defaults at the heal comparison's budget (``--steps`` x
``--block-size`` C4 tokens, batch 1, no held-out evaluation). Finished rows in ``--workdir`` are reused, and
so are the rows already in ``--output`` measured under the same protocol (each row keeps the revision, date
and torch threads it was measured with, in ``measured``).

    python benchmarks/prune_methods.py --workdir DIR
    python benchmarks/prune_methods.py --methods wanda,ria --settings 2:4 --eval-windows 2 --nsamples 4 \\
        --calib-seqlen 128 --heal-best 0                                  # a short check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached, machine, perplexity, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
# name -> prune flags; which settings each defines (the variant is unstructured, reallocation N:M only)
METHODS = {
    "magnitude": (["--method", "magnitude"], ("50%", "2:4", "70%")),
    "wanda": (["--method", "wanda"], ("50%", "2:4", "70%")),
    "wanda-variant": (["--method", "wanda", "--wanda-variant"], ("50%", "70%")),
    "sparsegpt": (["--method", "sparsegpt"], ("50%", "2:4", "70%")),
    "ablate_mag_seq": (["--method", "ablate_mag_seq"], ("50%", "2:4", "70%")),
    "ablate_wanda_seq": (["--method", "ablate_wanda_seq"], ("50%", "2:4", "70%")),
    "ablate_mag_iter": (["--method", "ablate_mag_iter"], ("50%", "2:4", "70%")),
    "ablate_wanda_iter": (["--method", "ablate_wanda_iter"], ("50%", "2:4", "70%")),
    "ria": (["--method", "ria"], ("50%", "2:4", "70%")),
    "ria-permute": (["--method", "ria", "--ria-permute"], ("2:4",)),
}
DSNOT = ("wanda", "sparsegpt", "ria")  # the calibrated methods refined with DSnoT as well
SETTINGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"], "70%": ["--sparsity", "0.7"]}
PROTOCOL = ("model", "nsamples", "calib_seqlen", "eval_windows")  # rows measured alike can be carried
HEAL_PROTOCOL = PROTOCOL + ("steps", "block_size")


def carried(output: Path, args) -> tuple[dict, dict]:
    """Rows (by label) and healed rows (by path) already in ``output`` under the same protocol."""
    if not output.is_file():
        return {}, {}
    old = json.loads(output.read_text())
    same = all(old["settings"].get(k) == getattr(args, k) for k in PROTOCOL)
    healing = same and all(old["settings"].get(k) == getattr(args, k) for k in HEAL_PROTOCOL)
    where = {"revision": old["stamp"]["revision"], "date": old["stamp"]["date"],
             "torch_threads": old["stamp"]["machine"]["torch_threads"]}
    rows = {r["path"]: {"measured": where, **r} for r in old["rows"]} if same else {}
    healed = {r["path"]: {"measured": where, **r} for r in old["healed"]} if healing else {}
    return rows, healed


def measured_here() -> dict:
    """Where a row measured by this run was measured (the threads a pruning subprocess gets)."""
    import datetime
    import subprocess

    revision = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True).stdout.strip()
    return {"revision": revision, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "torch_threads": machine()["torch_threads"]}


def label_of(method: str, setting: str, dsnot: bool) -> str:
    return f"{method}{'-dsnot' if dsnot else ''}-{setting.replace(':', 'of').replace('%', '')}"


def prune_row(method: str, setting: str, dsnot: bool, args, work: Path) -> dict:
    """Prunes and evaluates one configuration (reusing a finished one)."""
    label = label_of(method, setting, dsnot)
    out = work / label
    flags = METHODS[method][0] + SETTINGS[setting] + (["--refine", "dsnot"] if dsnot else [])
    cmd = PY + ["prune", args.model, "-o", str(out), "--nsamples", str(args.nsamples), "--seqlen",
                str(args.calib_seqlen), "--overwrite", *flags]
    run = cached(work / f"{label}.run.json", lambda: run_measured(cmd, log=work / f"{label}.log"))
    record = json.loads((out / "sparseheal.json").read_text())
    ppl = perplexity(str(out), work / f"{label}.eval.json", args.eval_windows, reuse=True)["ppl"]
    return {"method": method, "dsnot": "yes" if dsnot else "no", "setting": setting, "ppl": round(ppl, 3),
            "achieved": record["sparsity_achieved"], "prune_wall_s": run["wall_s"],
            "prune_cpu_s": run["cpu_s"], "peak_rss_mb": run["peak_rss_mb"], "path": out.name,
            "measured": measured_here()}


def heal_row(row: dict, args, work: Path) -> dict:
    """The default full heal of one pruned model at the budget, and its perplexity."""
    if not (work / row["path"]).is_dir():  # a row carried from another workdir: the same prune again
        prune_row(row["method"], row["setting"], row["dsnot"] == "yes", args, work)
    out = work / f"healed-{row['path']}"
    cmd = PY + ["heal", str(work / row["path"]), "-o", str(out), "--method", "full", "--max-steps",
                str(args.steps), "--block-size", str(args.block_size), "--batch-size", "1",
                "--gradient-accumulation", "1", "--max-eval-samples", "0", "--data", "c4", "--overwrite"]
    run = cached(work / f"{out.name}.run.json", lambda: run_measured(cmd, log=work / f"{out.name}.log"))
    ppl = perplexity(str(out), work / f"{out.name}.eval.json", args.eval_windows, reuse=True)["ppl"]
    return {**row, "healed_ppl": round(ppl, 3), "heal_wall_s": run["wall_s"], "heal_cpu_s": run["cpu_s"],
            "heal_peak_rss_mb": run["peak_rss_mb"], "measured": measured_here()}


def markdown(payload: dict) -> str:
    """The docs table of a results file: every row (where it was measured) and the healed ones."""
    lines = ["| method | DSnoT | pattern | WikiText-2 ppl | pruned share | prune wall s | prune CPU s | "
             "peak RSS MiB | measured at |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in payload["rows"]:
        where = r.get("measured", {})
        lines.append(f"| `{r['method']}` | {r['dsnot']} | {r['setting']} | {r['ppl']:.3f} | "
                     f"{r['achieved']:.4f} | {r['prune_wall_s']:.0f} | {r['prune_cpu_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | "
                     f"{where.get('revision', '')[:7]}, {where.get('torch_threads', '')} thr |")
    if payload["healed"]:
        lines += ["", "| method | DSnoT | pattern | ppl pruned | ppl after full heal | heal wall s | "
                      "heal CPU s |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| `{r['method']}` | {r['dsnot']} | {r['setting']} | {r['ppl']:.3f} | "
                  f"{r['healed_ppl']:.3f} | {r['heal_wall_s']:.0f} | "
                  f"{r.get('heal_cpu_s', float('nan')):.0f} |"
                  for r in payload["healed"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default="50%,2:4,70%")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--heal-best", type=int, default=3, help="heal the best N configurations at 2:4")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "prune_methods.json"))
    parser.add_argument("--markdown", action="store_true", help="print the docs table of --output and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.output).read_text())))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = args.settings.split(",")
    dense = perplexity(args.model, work / "dense.eval.json", args.eval_windows, reuse=True)["ppl"]
    old_rows, old_healed = carried(Path(args.output), args)
    rows: list[dict] = list(old_rows.values())  # kept unless measured again below

    def save(healed: list[dict]) -> None:  # after every row: an interrupted run keeps what it measured
        write_json(Path(args.output), {"settings": {k: v for k, v in vars(args).items() if k != "output"},
                                       "dense_ppl": round(dense, 3), "rows": rows, "healed": healed})

    for method in args.methods.split(","):
        for setting in (s for s in settings if s in METHODS[method][1]):
            for dsnot in (False, True) if method in DSNOT else (False,):
                if label_of(method, setting, dsnot) in old_rows:
                    continue
                rows.append(prune_row(method, setting, dsnot, args, work))
                print(json.dumps(rows[-1]), flush=True)
                save(list(old_healed.values()))
    print(f"dense perplexity {dense:.3f}")
    columns = ["method", "dsnot", "setting", "ppl", "achieved", "prune_wall_s", "prune_cpu_s", "peak_rss_mb"]
    print_table(rows, columns)
    best = sorted((r for r in rows if r["setting"] == "2:4"), key=lambda r: r["ppl"])[: args.heal_best]
    healed = []
    for r in best:
        healed.append(old_healed.get(r["path"]) or heal_row(r, args, work))
        save(healed)
    if healed:
        print_table(healed, ["method", "dsnot", "setting", "ppl", "healed_ppl", "heal_wall_s"])


if __name__ == "__main__":
    main()
