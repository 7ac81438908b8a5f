"""Reconstruction against end-to-end healing per token, per second and per byte (smollm2-135m).

Protocol: Wanda with 64 x 1024 C4 calibration tokens (seed 0) at each ``--settings`` entry (50%, 2:4, 70%,
70%-owl); WikiText-2 perplexity at seqlen 1024 over the first ``--eval-windows`` windows, and the same on
held-out text of another genre: Python source code (a fixed list of standard-library modules of the
interpreter that runs the benchmark, concatenated; its SHA-256 is in the JSON). For each budget of
training tokens (``--budgets``) the recipes are:

- ``full``: ``heal --method full --lr 3e-4 --warmup-steps 10``, budget / 1024 steps of 1024 tokens;
- ``lora``: LoRA on every linear, r 16, alpha 32, lr 1e-3, warm-up 10, mask-aware, merged with the mask;
- ``perp``: ``heal --method perp`` (norms and biases, lr 1e-3), the same steps;
- ``bw-layer`` / ``bw-sub``: ``heal --method blockwise`` by layer / by submodule on S = min(budget /
  1024, ``--max-samples``) calibration samples of 1024 tokens for budget / (1024 S) epochs (lr 1e-3),
  on the MSE; ``bw-layer-rel`` / ``bw-sub-rel``: the same on the relative loss (``--recon-loss``);
- ``bw-layer+full``, ``bw-layer-rel+full``, ``bw-sub+full``: that reconstruction on half the budget, then
  ``full`` on the other half.

Tokens seen are the tokens of the training steps (block-wise: steps x 1024 per unit, forward-only passes
not counted). Each heal runs in its own process: wall time, CPU time and peak RSS are that process's (the
sum and the maximum over a recipe's stages). Gap closed = (ppl_pruned - ppl) / (ppl_pruned - ppl_dense).
Finished runs in ``--workdir`` are reused; rows already in ``--output`` are kept.

    python benchmarks/heal_recon.py --workdir DIR --settings 50%,2:4 --budgets 100000
    python benchmarks/heal_recon.py --workdir DIR --settings 50% --budgets 2048 --recipes bw-sub,full \\
        --nsamples 4 --calib-seqlen 128 --eval-windows 2                  # a short check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cached, perplexity, print_table, run_measured, write_json  # noqa: E402

PY = [sys.executable, "-m", "sparseheal"]
SETTINGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"], "70%": ["--sparsity", "0.7"],
            "70%-owl": ["--sparsity", "0.7", "--layer-sparsity", "owl"]}
FULL = ["--method", "full", "--lr", "3e-4", "--warmup-steps", "10"]
LORA = ["--method", "lora", "--targets", "all-linear", "--rank", "16", "--alpha", "32", "--lr", "1e-3",
        "--warmup-steps", "10", "--mask-aware", "--merge", "masked"]
PERP = ["--method", "perp"]
RECIPES = ("full", "lora", "perp", "bw-layer", "bw-layer-rel", "bw-sub", "bw-sub-rel", "bw-layer+full",
           "bw-layer-rel+full", "bw-sub+full")
CODE_MODULES = ("textwrap", "json/decoder", "json/encoder", "argparse", "dataclasses", "functools",
                "collections/__init__", "pathlib", "inspect", "typing")
BLOCK = 1024


def code_text(path: Path) -> dict:
    """Writes the held-out code text (standard-library sources) to ``path``; returns what it holds."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((root / f"{name}.py").read_text() for name in CODE_MODULES)
    path.write_text(text)
    return {"modules": list(CODE_MODULES), "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "python": sys.version.split()[0]}


def prune(setting: str, args, work: Path) -> Path:
    out = work / f"pruned-{label(setting)}"
    cmd = PY + ["prune", args.model, "-o", str(out), "--method", "wanda", "--nsamples", str(args.nsamples),
                "--seqlen", str(args.calib_seqlen), "--overwrite", *SETTINGS[setting]]
    cached(work / f"{out.name}.run.json", lambda: run_measured(cmd, log=work / f"{out.name}.log"))
    return out


def label(text: str) -> str:
    return text.replace(":", "of").replace("%", "")


def trainer_stage(flags: list[str], tokens: int) -> tuple[list[str], int]:
    steps = max(1, tokens // BLOCK)
    return flags + ["--max-steps", str(steps), "--block-size", str(BLOCK), "--batch-size", "1",
                    "--gradient-accumulation", "1", "--max-eval-samples", "0", "--data", "c4"], steps * BLOCK


def blockwise_stage(recipe: str, tokens: int, max_samples: int) -> tuple[list[str], int]:
    """``bw-layer``, ``bw-sub``, with ``-rel``: the relative loss (else MSE)."""
    samples = max(1, min(tokens // BLOCK, max_samples))
    epochs = tokens / (BLOCK * samples)
    granularity = "layer" if recipe.startswith("bw-layer") else "submodule"
    loss = "relative" if recipe.endswith("-rel") else "mse"
    flags = ["--method", "blockwise", "--granularity", granularity, "--recon-loss", loss, "--nsamples",
             str(samples), "--seqlen", str(BLOCK), "--epochs", f"{epochs:.6g}"]
    return flags, max(1, round(epochs * samples)) * BLOCK


def stages(recipe: str, budget: int, max_samples: int) -> list[tuple[list[str], int]]:
    """The heal commands' flags of a recipe at a budget, and the training tokens each sees; a recipe
    ``NAME@LR`` (``bw-layer-rel@3e-3``) trains its reconstruction stage at that learning rate."""
    if "@" in recipe:
        name, lr = recipe.split("@")
        found = stages(name, budget, max_samples)
        return [(flags + ["--lr", lr], seen) if "blockwise" in flags else (flags, seen)
                for flags, seen in found]
    if recipe == "full":
        return [trainer_stage(FULL, budget)]
    if recipe == "lora":
        return [trainer_stage(LORA, budget)]
    if recipe == "perp":
        return [trainer_stage(PERP, budget)]
    if recipe.startswith("bw-") and not recipe.endswith("+full"):
        return [blockwise_stage(recipe, budget, max_samples)]
    if recipe.startswith("bw-"):
        return [blockwise_stage(recipe[:-len("+full")], budget // 2, max_samples),
                trainer_stage(FULL, budget // 2)]
    raise SystemExit(f"--recipes: unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")


def _order(recipe: str) -> tuple[int, str]:
    """Recipes in the order of RECIPES, learning-rate variants after their base."""
    return RECIPES.index(recipe.split("@")[0]), recipe


def heal_row(setting: str, budget: int, recipe: str, pruned: Path, args, work: Path) -> dict:
    """Runs a recipe's stages (reusing finished ones) and measures the healed model."""
    source, runs, tokens = pruned, [], 0
    for number, (flags, seen) in enumerate(stages(recipe, budget, args.max_samples)):
        out = work / f"{pruned.name}-{recipe}-{budget}-{number}"
        cmd = PY + ["heal", str(source), "-o", str(out), *flags, "--overwrite"]
        runs.append(cached(work / f"{out.name}.run.json", lambda c=cmd, o=out: run_measured(
            c, log=work / f"{o.name}.log")))
        source, tokens = (out / "merged" if (out / "merged").is_dir() else out), tokens + seen
    measured = evaluations(str(source), f"{pruned.name}-{recipe}-{budget}", args, work)
    wiki, code = measured["ppl"], measured["code_ppl"]
    return {"setting": setting, "budget": budget, "recipe": recipe, "tokens": tokens, "ppl": round(wiki, 3),
            "code_ppl": round(code, 3), "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "cpu_s": round(sum(r["cpu_s"] for r in runs), 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "stages": len(runs),
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "all")}


def with_gaps(row: dict, base: dict) -> dict:
    """Adds the share of the pruning gap closed on both texts."""
    for key, ppl in (("gap_closed", "ppl"), ("code_gap_closed", "code_ppl")):
        gap = base[f"pruned_{ppl}"] - base[f"dense_{ppl}"]
        row[key] = round((base[f"pruned_{ppl}"] - row[ppl]) / gap, 4) if gap > 0 else None
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Gap closed against training tokens (top) and against wall time (bottom), a column per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(2, len(settings), figsize=(4.5 * len(settings), 7), squeeze=False)
    for col, setting in enumerate(settings):
        for recipe in sorted({r["recipe"] for r in rows}, key=_order):
            points = sorted((r["tokens"], r["wall_s"], 100 * r["gap_closed"]) for r in rows if
                            (r["setting"], r["recipe"]) == (setting, recipe) and r["gap_closed"] is not None)
            if points:
                tokens, wall, gap = zip(*points, strict=True)
                axes[0][col].plot(tokens, gap, marker="o", label=recipe)
                axes[1][col].plot(wall, gap, marker="o", label=recipe)
        axes[0][col].set(title=f"Wanda {setting}", xscale="log", xlabel="training tokens",
                         ylabel="gap closed (%)")
        axes[1][col].set(xscale="log", xlabel="wall time (s)", ylabel="gap closed (%)")
        axes[1][col].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def markdown(payload: dict) -> str:
    """The docs table of a results file: each row with its share of the gap closed on both texts, and its
    wall time and peak RSS against full fine-tuning's at 100K tokens on the same setting."""
    full = {r["setting"]: r for r in payload["rows"] if (r["recipe"], r["budget"]) == ("full", 100000)}
    lines = ["| setting | budget | recipe | tokens | WikiText-2 ppl (gap closed) | code ppl (gap closed) | "
             "wall s | CPU s | peak RSS MiB | wall, RSS vs full 100K |", "|---|---:|---|---:|---:|---:|---:|"
             "---:|---:|---|"]
    for r in sorted(payload["rows"], key=lambda r: (r["setting"], r["budget"], _order(r["recipe"]))):
        base = full.get(r["setting"])
        ratio = (f"{r['wall_s'] / base['wall_s']:.2f}x, {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x"
                 if base else "")
        lines.append(f"| {r['setting']} | {r['budget']} | `{r['recipe']}` | {r['tokens']} | {r['ppl']:.2f} "
                     f"({100 * r['gap_closed']:.1f}%) | {r['code_ppl']:.2f} "
                     f"({100 * r['code_gap_closed']:.1f}%) | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {ratio} |")
    return "\n".join(lines)


def evaluations(model: str, name: str, args, work: Path) -> dict:
    """WikiText-2 and held-out code perplexity of a model."""
    return {"ppl": perplexity(model, work / f"{name}.eval.json", args.eval_windows, reuse=True)["ppl"],
            "code_ppl": perplexity(model, work / f"{name}.code.json", args.eval_windows, reuse=True,
                                   dataset=str(work / "code.txt"))["ppl"]}


def kept_rows(output: Path, args) -> tuple[list[dict], dict]:
    """Rows and pruned baselines already in ``output``, measured under the same protocol."""
    old = json.loads(output.read_text()) if output.is_file() else {}
    same = old and all(old["settings"].get(k) == getattr(args, k)
                       for k in ("model", "nsamples", "calib_seqlen", "eval_windows", "max_samples"))
    return (list(old["rows"]), dict(old["pruned"])) if same else ([], {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--settings", default="50%,2:4,70%,70%-owl")
    parser.add_argument("--budgets", default="25000,100000,400000", help="training tokens per heal")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--max-samples", type=int, default=32, help="calibration samples of block-wise")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "heal_recon.json"))
    parser.add_argument("--plot", default=str(Path(__file__).parent / "results" / "heal_recon.png"))
    parser.add_argument("--markdown", action="store_true", help="print the docs table of --output and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.output).read_text())))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-recon-"))
    work.mkdir(parents=True, exist_ok=True)
    code = code_text(work / "code.txt")
    dense = evaluations(args.model, "dense", args, work)
    rows, pruned_rows = kept_rows(Path(args.output), args)
    done = {(r["setting"], r["budget"], r["recipe"]) for r in rows}
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "plot")}
    for setting in args.settings.split(","):
        pruned = prune(setting, args, work)
        base = {f"dense_{k}": v for k, v in dense.items()}
        base.update({f"pruned_{k}": v for k, v in evaluations(str(pruned), pruned.name, args, work).items()})
        pruned_rows[setting] = {k: round(v, 3) for k, v in base.items()}
        for budget in (int(b) for b in args.budgets.split(",")):
            for recipe in (r for r in args.recipes.split(",") if (setting, budget, r) not in done):
                rows.append(with_gaps(heal_row(setting, budget, recipe, pruned, args, work), base))
                print(json.dumps(rows[-1]), flush=True)
                write_json(Path(args.output), {"settings": settings, "code_text": code, "pruned": pruned_rows,
                                               "rows": rows})
    print_table(rows, ["setting", "budget", "recipe", "tokens", "ppl", "gap_closed", "code_ppl",
                       "code_gap_closed", "wall_s", "cpu_s", "peak_rss_mb"])
    if rows:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
