"""The command line, generated from the stages' settings declarations (Typer): parsing and printing only.

Every setting of a stage becomes a flag spelled with dashes (the underscore spelling is accepted too);
a setting declared positional is an argument. ``--config FILE.yaml`` on every command supplies values
by the same names. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from sparseheal import api
from sparseheal.errors import ConfigError, StageError
from sparseheal.evaluate.base import evaluators
from sparseheal.layout import describe_families
from sparseheal.records import read_record
from sparseheal.registry import HEALERS
from sparseheal.run import report as report_stage
from sparseheal.run import run as run_stage
from sparseheal.run.report import results_table
from sparseheal.settings import Field, flag_keys, parse_yaml

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Prune Hugging Face causal LMs and heal them, keeping every pruned weight exactly zero.",
)
_SHORT = {"output": "-o"}
_ARGV: list[str] = []  # the arguments of the running command, for the message of an interrupted one


def _config_callback(ctx: typer.Context, _param: typer.CallbackParam, value: str | None) -> None:
    if not value:
        return
    path = Path(value)
    if not path.is_file():
        raise ConfigError("--config", f"{value} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("--config", f"{value} is not UTF-8 text; give a YAML file") from err
    data = parse_yaml(text, "--config", value) or {}  # YAML 1.2 numbers: 2:4 stays a string, 1e-4 a float
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{value} must hold a mapping of flag names to values")
    known = {p.name for p in ctx.command.params if p.name != "config"}
    defaults = {}
    flag_keys(data, "--config")  # both spellings of one setting: refused
    for key, val in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            raise ConfigError(f"{value}: {key}", f"unknown key{hint} (valid: {', '.join(sorted(known))})")
        defaults[name] = ",".join(map(str, val)) if isinstance(val, list) else val
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


def _typer_param(field: Field) -> inspect.Parameter:
    """A positional setting is an argument; every other one is a flag (required when it has no default)."""
    name, hint = field.name, field.type
    param = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=hint)
    if field.positional:
        return param.replace(annotation=Annotated[hint, typer.Argument(help=field.help, show_default=False)],
                             default=...)
    decls = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else []) + (
        [_SHORT[name]] if name in _SHORT else []
    )
    if hint is bool:
        decls = [f"{d}/--no-{d[2:]}" if d.startswith("--") and i == 0 else d for i, d in enumerate(decls)]
    info = typer.Option(*decls, help=field.help)
    return param.replace(annotation=Annotated[hint, info], default=... if field.required else field.default)


def command(func: Callable, printer: Callable[[Any], int | None], name: str | None = None) -> Callable:
    """Registers the stage function ``func`` as a subcommand; ``printer`` shows its result and may return
    an exit code. A stage with its own ``config`` setting (``run``, whose recipe has sections) reads it
    itself instead of through the flat ``--config``.
    """
    fields = func.stage.fields()
    params = sorted((_typer_param(f) for f in fields), key=lambda p: p.default is not ...)
    own_config = any(f.name == "config" for f in fields)
    if not own_config:
        config_info = typer.Option("--config", help="YAML file of flag values (same names).", is_eager=True,
                                   callback=_config_callback)
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[str | None, config_info]))

    def run(**kwargs: Any) -> int:
        if not own_config:
            kwargs.pop("config", None)
        try:
            result = func(**kwargs)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): say what was kept and how to go on
            _close_progress_bars()
            print(_interrupted(_ARGV), file=sys.stderr)
            raise typer.Exit(130) from None
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate only rank 0 reports
            return 0
        return printer(result) or 0

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__doc__ = (inspect.getdoc(func) or "").split("\n\n")[0]
    app.command(name or func.__name__)(run)
    return run


def _print_prune(output: Path) -> None:
    record = read_record(output) or {}
    families = record.get("families")
    print(f"pruned {record.get('base_model')} with {record.get('method')} ({record.get('pattern')}): "
          f"{100 * record.get('sparsity_achieved', 0):.2f}% of prunable weights are zero -> {output}")
    if families:
        print(f"  by family in the decoder layers: {describe_families(families)}")
    dense = (record.get("plan") or {}).get("dense")
    if dense:
        print(f"  kept dense by the plan: {dense['modules']} weights ({dense['parameters']:,d} parameters), "
              "not counted above")



def _print_evaluate(report: dict) -> None:
    for evaluator in evaluators():
        if evaluator.key in report:
            print("\n".join(evaluator.lines(report[evaluator.key])))


def _print_run(record: dict) -> None:
    stages = record.get("stages", {})
    ran = [n for n, s in stages.items() if not s.get("skipped")]
    skipped = [n for n, s in stages.items() if s.get("skipped")]
    print(f"stages run: {', '.join(ran) or 'none'}; skipped (finished): {', '.join(skipped) or 'none'}")
    _print_report(record["report"])


def _print_report(report: dict) -> None:
    print(results_table(report))
    print(f"report: {report['path']}")


def _print_inspect(report: dict) -> int:
    print(f"{'layer':<48} {'shape':<14} {'sparsity':>8} {'N:M':>5} {'N:M bad':>7} {'mask bad':>8}  pattern")
    for r in report["layers"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<48} {shape:<14} {r['sparsity']:>8.4f} {r['nm_detected'] or '-':>5} "
              f"{r.get('nm_violations', '-'):>7} {r.get('mask_violations', '-'):>8}  {r.get('pattern', '-')}")
    spread = report.get("layer_sparsity") or {}
    if spread.get("mode") == "owl":
        shown = ", ".join(f"{i}: {x:.3f}" for i, x in enumerate(spread["sparsities"]))
        print(f"owl layer sparsities (M={spread['m']:g}, lambda={spread['lambda']:g}): {shown}")
    if report.get("families_line"):
        print(f"by family in the decoder layers: {report['families_line']}")
    if report.get("exported"):
        print(f"masks exported to {report['exported']}")
    print(f"total sparsity {report['total_sparsity']:.4f}; pattern {report['pattern']}; "
          f"N:M violations {report['nm_violations']}; mask violations {report['mask_violations']}; "
          f"{'OK' if report['ok'] else 'FAILED'}")
    return 0 if report["ok"] else 1


def _print_heal(output: Path) -> None:
    r = read_record(output) or {}
    if r.get("auto"):
        chosen = r["auto"]
        stages = ", then ".join(f"{s['method']} on {s['tokens']} tokens" for s in chosen["stages"])
        print(f"auto: {chosen['recipe']} for {chosen['budget_tokens']} tokens ({stages})")
    healer = HEALERS.get(r["heal_method"]) if r.get("heal_method") in HEALERS.names() else None
    line = healer.summary(r) if healer else None
    if line:
        print(f"{line} -> {output}")
        return
    losses = f"loss {r.get('first_loss') or float('nan'):.4f} -> {r.get('final_loss') or float('nan'):.4f}"
    if r.get("eval_loss") is not None:
        losses += f", eval loss {r['eval_loss']:.4f}"
    print(f"healed {r.get('base_model')} with {r.get('method')}: {r.get('steps')} steps, "
          f"{r.get('tokens_seen')} tokens ({r.get('tokens_per_second')} tokens/s), {losses} -> {output}")
    merged = r.get("merged")
    if merged:
        target = output / merged["path"]
        print(f"merged ({merged['mode']}): sparsity {merged['sparsity_after']:.4f} -> {target}")


def _print_merge(output: Path) -> None:
    r = read_record(output) or {}
    stats = r.get("merge", {})
    line = (f"merged {r.get('adapter')} ({stats.get('mode')}): sparsity of the pruned layers "
            f"{stats.get('sparsity_before', 0):.4f} -> {stats.get('sparsity_after', 0):.4f}")
    if "eval" in stats:
        e = stats["eval"]
        line += f"; ppl {e['ppl_unmerged']:.4f} (adapter) -> {e['ppl_merged']:.4f} (merged)"
    print(f"{line} -> {output}")


command(api.prune, _print_prune)
command(api.heal, _print_heal)
command(api.merge, _print_merge)
command(api.evaluate, _print_evaluate)
command(api.inspect, _print_inspect)
command(run_stage, _print_run)
command(report_stage, _print_report)


def _output_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-o", "--output") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
    return None


def _interrupted(argv: list[str]) -> str:
    """One line: what was interrupted, what was kept, and how to go on."""
    from sparseheal.heal.checkpoints import checkpoint_dir_for, last_checkpoint

    command, output = (argv[0] if argv else "sparseheal"), _output_of(argv)
    line = f"sparseheal: interrupted: {command}" + (f" of {output}" if output else "")
    if command == "run":
        return f"{line}; finished stages are kept: run the same command again to go on"
    last = last_checkpoint(checkpoint_dir_for(output)) if command == "heal" and output else None
    if last is not None:
        resume = shlex.join(["sparseheal", *argv, *([] if "--resume" in argv else ["--resume"])])
        return f"{line}; nothing written, checkpoint {last} kept: resume with {resume}"
    return f"{line}; nothing was written"


def _close_progress_bars() -> None:
    """Closes the progress bars an interrupted stage left open, so that the last line is the message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``sparseheal`` and ``python -m sparseheal``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends a stage as Ctrl-C does
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="sparseheal", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except (ConfigError, StageError) as exc:
        print(f"sparseheal: error: {exc}", file=sys.stderr)
        code = 2 if isinstance(exc, ConfigError) else 1
    except TyperException as exc:  # usage errors: unknown option, bad type, missing value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"sparseheal: error: {' '.join(message.split())}", file=sys.stderr)
        code = getattr(exc, "exit_code", 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else 0)
