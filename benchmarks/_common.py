"""Helpers shared by the benchmark scripts: subprocess runs with per-process peak RSS, tables, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_measured", "cached", "perplexity", "print_table", "write_json", "machine"]

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "SPARSEHEAL_DATA_DIR" not in os.environ and _SHARED_DATA.is_dir():
    os.environ["SPARSEHEAL_DATA_DIR"] = str(_SHARED_DATA)  # the mirror beside the checkout, as `make` sets it


def run_measured(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Runs ``cmd``; returns its wall time, CPU time (user + system; system alone), minor page faults and
    peak RSS (MiB) of that process alone.

    CPU time is the fairer speed measure on a shared machine: it barely moves when other work competes.
    """
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    if proc.returncode != 0:
        tail = Path(log).read_text()[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd)} failed with {proc.returncode}\n{tail}")
    return {
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "minor_faults": usage.ru_minflt,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def cached(path: Path, make) -> dict:
    """``make()``'s JSON result, kept in ``path`` and read from there when a run is resumed."""
    if path.is_file():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value))
    return value


def perplexity(model: str, result: Path, windows: int, seqlen: int = 1024, dtype: str | None = None,
               adapter: str | None = None, device: str | None = None, reuse: bool = False,
               dataset: str | None = None) -> dict:
    """WikiText-2 (or ``dataset``'s) perplexity of ``model`` through ``sparseheal evaluate`` in its own
    process.

    Writes ``result`` (and ``result`` with ``.log``); with ``reuse``, a result already there at the same
    windows, sequence length and dtype is returned without evaluating again.

    Returns:
        the evaluation's first result (``ppl``, ``windows``, ``seqlen``, ``dtype``, ...)
    """
    if reuse and result.is_file():
        res = json.loads(result.read_text())["results"][0]
        if (res["windows"], res["seqlen"]) == (windows, seqlen) and dtype in (None, res["dtype"]):
            return res
    cmd = [sys.executable, "-m", "sparseheal", "evaluate", model, "--seqlen", str(seqlen),
           "--max-windows", str(windows), "-o", str(result)]
    cmd += ["--dtype", dtype] if dtype else []
    cmd += ["--adapter", adapter] if adapter else []
    cmd += ["--device", device] if device else []
    cmd += ["--dataset", dataset] if dataset else []
    run_measured(cmd, log=result.with_suffix(".log"))
    return json.loads(result.read_text())["results"][0]


def print_table(rows: list[dict], columns: list[str]) -> str:
    """Prints rows as a markdown table and returns it."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def _portable(arg: str, root: Path) -> str:
    """An argument without this machine's paths: relative inside the checkout, ``.../NAME`` outside it."""
    if not os.path.isabs(arg):
        return arg
    return os.path.relpath(arg, root) if arg.startswith(str(root)) else ".../" + Path(arg).name


def stamp() -> dict:
    """What a result was measured with: the code revision, the date, the machine and the command."""
    import datetime
    import shlex
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                  text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        revision, dirty = None, None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    argv = [_portable(a, root) for a in sys.argv]
    return {"revision": revision, "uncommitted_changes": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpu": cpu, **machine()}, "command": "python " + shlex.join(argv)}


def write_json(path: Path, payload: dict) -> None:
    """Writes a result, stamped (see :func:`stamp`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stamp": stamp(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")


def machine() -> dict:
    import platform

    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
