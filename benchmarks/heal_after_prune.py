"""A heal in a fresh process against a heal in a process that has pruned before (as in ``sparseheal run``).

A prune's layer loop sets glibc's allocator thresholds (``sparsity/heap.py``) and, on leaving, sets them
where glibc's dynamic rule settles (mmap 32 MiB, trim 64 MiB); they stay so for the rest of the process.
This compares ``sparseheal heal --method full`` (``--steps`` steps of ``--block-size`` C4 tokens) in a
fresh process with the same heal in a process that first left :func:`heap_kept`, alternated
``--repeats`` times: training tokens/s and peak RSS.

    python benchmarks/heal_after_prune.py --pruned DIR --workdir W
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_measured, write_json  # noqa: E402

_HEAL = """
import sys
from sparseheal.sparsity.heap import heap_kept
if sys.argv[1] == "after prune":
    with heap_kept():
        pass
from sparseheal.cli import main
sys.argv = ["sparseheal"] + sys.argv[2:]
main()
"""


def heal(mode: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-c", _HEAL, mode, "heal", args.pruned, "-o", str(out), "--method", "full",
           "--data", "c4", "--max-steps", str(args.steps), "--block-size", str(args.block_size),
           "--max-eval-samples", "0", "--seed", "0", "--dtype", "float32", "--lr", "2e-5", "--scheduler",
           "linear", "--overwrite"]
    run = run_measured(cmd, log=out.with_suffix(".log"))
    record = json.loads((out / "sparseheal.json").read_text())
    return {"tokens_per_second": record["tokens_per_second"], "peak_rss_mb": run["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/heal_after_prune.json")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"fresh": [], "after prune": []}
    for repeat in range(args.repeats):
        for mode, rows in runs.items():
            rows.append(heal(mode, args, work / f"{mode.replace(' ', '-')}-{repeat}"))
            print(mode, rows[-1], flush=True)
    table = []
    for mode, rows in runs.items():
        speeds = [r["tokens_per_second"] for r in rows]
        table.append({"process": mode, "tokens_per_second": statistics.median(speeds),
                      "range": f"{min(speeds)}-{max(speeds)}",
                      "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows)})
    print_table(table, ["process", "tokens_per_second", "range", "peak_rss_mb"])
    payload = {"settings": vars(args), "machine": machine(), "runs": runs, "table": table}
    write_json(Path(args.output), payload)


if __name__ == "__main__":
    main()
