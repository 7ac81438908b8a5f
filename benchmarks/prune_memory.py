"""Peak memory of layer-by-layer pruning: measured on smollm2-135m, predicted for LLaMA-2 7B and 70B.

Each measurement is a child process: ``sparseheal prune`` itself (Wanda, unstructured 50%) with and
without ``--offload``, and a phase run of the same pipeline (``sparseheal.prune`` with its load, prune
and save steps wrapped) that reports the resident memory of each phase (Linux ``VmRSS``; the peak
``VmHWM`` is reset between phases through ``/proc/self/clear_refs``).

The memory model, from ``sparsity/calibrate.py`` (B = --calibration-batch-size, N x T calibration
tokens, d hidden, I intermediate, h head dim, a bytes per weight/activation element):

    runtime          R  Python, torch, transformers, model code, tokenizer and calibration text
                        (measured after loading, less the weight pages mapped by then)
    model            M  parameters x a
    activations      A  N T (d + 2h) a + 8 N T   one copy of the layer inputs, outputs written in place,
                                                  plus the rotary cos/sin and position ids kept per batch
    batch work       W  B T (3 I a + 8 I + 6 d a) one batch through one layer (MLP intermediates, the
                                                  float32 statistic of the widest input, attention)
    statistics       S  4 x sum of linear in-features (Wanda's per-column sums; SparseGPT: 4 x in^2 each)
    prune transient  P  17 x out x in of the largest linear (float32 scores, sort values and int64
                                                  indices, bool mask)
    masks            K  prunable parameters / 8 (bit-packed, kept on the host)

    host peak, compute on the host:   R + M + A + W + S + P + K + 8 N T (token ids)

    with --offload on an accelerator: host   R + M + K + 8 N T
                                      device E + L + A + W + S + P
                                      (E: embeddings, final norm and head, which stay on the device
                                      after the capture; L: one decoder layer)

M counts in full although the weights are loaded memory-mapped from the safetensors file: a page is
resident once read, and each pruned weight becomes a private copy when the pruner writes into it, so by
the last layer the whole model is resident. A is one copy, not two: each layer's outputs overwrite its
inputs batch by batch; only one batch's output exists beside them (part of W).

The peak RSS of identical runs differs (measured at 2 x 128: 972 to 1059 MiB in seven of nine runs,
1124 and 1488 in two), by more than the terms above explain, most likely freed blocks that the
allocator keeps; ``--repeats`` shows the spread.

    python benchmarks/prune_memory.py                               # 64 x 1024 calibration
    python benchmarks/prune_memory.py --nsamples 8 --seqlen 512     # about two minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, run_measured, write_json  # noqa: E402

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class DecoderSpec:
    """The shapes that set pruning memory, for a LLaMA-style decoder."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, name: str, config) -> DecoderSpec:
        return cls(name, config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads, config.vocab_size,
                   bool(config.tie_word_embeddings))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of each prunable linear of one layer: q, k, v, o, gate, up, down."""
        d, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return [(d, d), (kv, d), (kv, d), (d, d), (i, d), (i, d), (d, i)]

    def layer_params(self) -> int:
        return sum(o * i for o, i in self.linears()) + 2 * self.hidden  # + two norms

    def outside_params(self) -> int:
        """Embeddings, final norm and head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.outside_params()

    def prunable(self) -> int:
        return self.layers * sum(o * i for o, i in self.linears())


LLAMA2 = [
    DecoderSpec("LLaMA-2-7B", 4096, 32, 11008, 32, 32, 32000, False),
    DecoderSpec("LLaMA-2-70B", 8192, 80, 28672, 64, 8, 32000, False),
]


def memory_terms(spec: DecoderSpec, nsamples: int, seqlen: int, batch: int,
                 elem_bytes: int) -> dict[str, int]:
    """Bytes of each term of the memory model (see the module docstring) for Wanda."""
    tokens = nsamples * seqlen
    d, i, a = spec.hidden, spec.intermediate, elem_bytes
    return {
        "model": spec.params() * a,
        "layer": spec.layer_params() * a,
        "outside_layers": spec.outside_params() * a,
        "activations": tokens * (d + 2 * spec.head_dim) * a + 8 * tokens,
        "batch_work": batch * seqlen * (3 * i * a + 8 * i + 6 * d * a),
        "statistics": 4 * sum(inp for _, inp in spec.linears()),
        "prune_transient": 17 * max(o * inp for o, inp in spec.linears()),
        "masks": spec.prunable() // 8,
        "token_ids": 8 * tokens,
    }


def predict(terms: dict[str, int], runtime: int) -> dict[str, int]:
    """Peak bytes: on the host when it computes, and on host and device with --offload."""
    work = terms["activations"] + terms["batch_work"] + terms["statistics"] + terms["prune_transient"]
    return {
        "host_peak": runtime + terms["model"] + work + terms["masks"] + terms["token_ids"],
        "offload_host_peak": runtime + terms["model"] + terms["masks"] + terms["token_ids"],
        "offload_device_peak": terms["outside_layers"] + terms["layer"] + work,
    }


# --- the phase run (a child process) -------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _resident() -> dict[str, float]:
    """Resident memory now: in total, anonymous (private copies) and file-backed (mapped weights)."""
    return {"after_mib": round(_status_kib("VmRSS") / 1024, 1),
            "anon_mib": round(_status_kib("RssAnon") / 1024, 1),
            "file_mib": round(_status_kib("RssFile") / 1024, 1)}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _phase(name: str, func, phases: dict):
    def wrapper(*args, **kwargs):
        _reset_peak()
        result = func(*args, **kwargs)
        phases[name] = {"peak_mib": round(_status_kib("VmHWM") / 1024, 1), **_resident()}
        return result

    return wrapper


def phase_child(args: argparse.Namespace) -> None:
    """Runs ``sparseheal.prune`` with its phases measured; writes JSON to ``args.child_out``."""
    import sparseheal
    import sparseheal.api as api
    import sparseheal.sparsity.calibrate as calibrate

    phases: dict = {"imported": _resident()}
    captured: dict = {}
    capture = calibrate.capture_layer_inputs

    def measured_capture(*a, **kw):
        batches = capture(*a, **kw)
        held = {id(t): t for hidden, kwargs in batches for t in [hidden, *_tensors(kwargs)]}  # once each
        captured["activation_bytes"] = sum(t.numel() * t.element_size() for t in held.values())
        return batches

    calibrate.capture_layer_inputs = measured_capture
    api.load_model = _phase("load", api.load_model, phases)
    api.prune_model = _phase("prune", api.prune_model, phases)
    api.save_model = _phase("save", api.save_model, phases)
    sparseheal.prune(args.model, args.child_out + ".model", method="wanda", sparsity=0.5,
                     nsamples=args.nsamples, seqlen=args.seqlen, calibration_batch_size=args.batch,
                     offload=args.offload, overwrite=True)
    Path(args.child_out).write_text(json.dumps({"phases": phases, **captured}))


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


# --- the parent --------------------------------------------------------------------------------------


def run_cli(args: argparse.Namespace, work: Path, offload: bool) -> dict:
    out = work / f"pruned-offload{int(offload)}"
    cmd = [sys.executable, "-m", "sparseheal", "prune", args.model, "-o", str(out), "--method", "wanda",
           "--sparsity", "0.5", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--calibration-batch-size", str(args.batch), "--overwrite", *(["--offload"] if offload else [])]
    run = run_measured(cmd, log=work / f"{out.name}.log")
    record = json.loads((out / "sparseheal.json").read_text())
    return {"run": f"sparseheal prune{' --offload' if offload else ''}", "offload": offload,
            "peak_rss_mib": run["peak_rss_mb"], "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
            "prune_s": record["timings"]["prune"], "sparsity": record["sparsity_achieved"]}


def run_phases(args: argparse.Namespace, work: Path) -> dict:
    out = work / "phases.json"
    cmd = [sys.executable, __file__, "--child-out", str(out), "--model", args.model, "--nsamples",
           str(args.nsamples), "--seqlen", str(args.seqlen), "--batch", str(args.batch), "--offload"]
    run = run_measured(cmd, log=work / "phases.log")
    return {**json.loads(out.read_text()), "peak_rss_mib": run["peak_rss_mb"]}


def _mib(n: int) -> float:
    return round(n / MIB, 1)


def _gib(n: int) -> float:
    return round(n / GIB, 2)


def measured_comparison(spec: DecoderSpec, args, cli_rows: list[dict], phases: dict) -> tuple[dict, list]:
    """The model's terms for the measured configuration (float32), beside what was measured."""
    measured = phases["phases"]
    # what the process holds besides the model once it is loaded: libraries, model code, tokenizer,
    # calibration text; the weights' pages mapped so far are taken out (they belong to M)
    mapped = measured["load"]["file_mib"] - measured["imported"]["file_mib"]
    runtime = int((measured["load"]["after_mib"] - mapped) * MIB)
    terms = memory_terms(spec, args.nsamples, args.seqlen, args.batch, 4)
    predicted = predict(terms, runtime)
    rows = [{"term": "runtime R (after load, less mapped weight pages)", "measured_mib": _mib(runtime)},
            {"term": "model M", "predicted_mib": _mib(terms["model"])},
            {"term": "activations A", "predicted_mib": _mib(terms["activations"]),
             "measured_mib": _mib(phases["activation_bytes"] + terms["token_ids"])}]
    rows += [{"term": f"{name} {symbol}", "predicted_mib": _mib(terms[name])} for name, symbol in
             (("batch_work", "W"), ("statistics", "S"), ("prune_transient", "P"), ("masks", "K"))]
    rows += [{"term": "after load (weights mapped, mostly not resident yet)",
              "measured_mib": measured["load"]["after_mib"]},
             {"term": "after prune (R + M + K resident)", "predicted_mib": _mib(runtime + terms["model"]
                                                                             + terms["masks"]),
              "measured_mib": measured["prune"]["after_mib"]},
             {"term": "prune peak (R+M+A+W+S+P+K)", "predicted_mib": _mib(predicted["host_peak"]),
              "measured_mib": measured["prune"]["peak_mib"]},
             {"term": "save peak", "measured_mib": measured["save"]["peak_mib"]}]
    for row in cli_rows:
        row["predicted_mib"] = _mib(predicted["host_peak"])
        row["off_by_pct"] = round(100 * (row["peak_rss_mib"] / row["predicted_mib"] - 1), 1)
    return {"terms_bytes": terms, "predicted_bytes": predicted, "runtime_bytes": runtime}, rows


def large_predictions(runtime: int, nsamples: int, seqlen: int, batch: int) -> list[dict]:
    rows = []
    for spec in LLAMA2:
        terms = memory_terms(spec, nsamples, seqlen, batch, 2)  # fp16 weights and activations
        peaks = predict(terms, runtime)
        rows.append({"model": spec.name, "params_b": round(spec.params() / 1e9, 2),
                     "fp16_weights_gib": _gib(terms["model"]), "layer_gib": _gib(terms["layer"]),
                     "activations_gib": _gib(terms["activations"]),
                     "batch_work_gib": _gib(terms["batch_work"]),
                     "prune_transient_gib": _gib(terms["prune_transient"]),
                     "masks_gib": _gib(terms["masks"]),
                     "host_peak_gib": _gib(peaks["host_peak"]),
                     "offload_host_peak_gib": _gib(peaks["offload_host_peak"]),
                     "offload_device_peak_gib": _gib(peaks["offload_device_peak"]),
                     "spec": asdict(spec), "terms_bytes": terms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2, help="--calibration-batch-size")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each sparseheal prune command "
                        "(the peak of identical runs differs)")
    parser.add_argument("--output", default="benchmarks/results/prune_memory.json")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_out:
        return phase_child(args)

    from sparseheal.models import load_config

    spec = DecoderSpec.from_config(args.model, load_config(args.model))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    cli_rows = [run_cli(args, work, offload) for _ in range(args.repeats) for offload in (False, True)]
    phases = run_phases(args, work)
    fp32_mib = _mib(spec.params() * 4)
    for row in cli_rows:
        row["x_fp32_size"] = round(row["peak_rss_mib"] / fp32_mib, 2)
    comparison, breakdown = measured_comparison(spec, args, cli_rows, phases)
    large = large_predictions(comparison["runtime_bytes"], 128, 2048, args.batch)
    print(f"{args.model}: {spec.params() / 1e6:.1f}M parameters, fp32 size {fp32_mib:.0f} MiB; calibration "
          f"{args.nsamples} x {args.seqlen}, batch {args.batch}")
    print_table(breakdown, ["term", "predicted_mib", "measured_mib"])
    print_table(cli_rows, ["run", "peak_rss_mib", "predicted_mib", "off_by_pct", "x_fp32_size", "prune_s",
                           "wall_s", "cpu_s"])
    print("LLaMA-2, fp16 weights, 128 x 2048 calibration tokens, batch", args.batch)
    print_table(large, ["model", "params_b", "fp16_weights_gib", "activations_gib", "prune_transient_gib",
                        "host_peak_gib", "offload_host_peak_gib", "offload_device_peak_gib"])
    write_json(Path(args.output), {
        "settings": {k: v for k, v in vars(args).items() if k not in ("offload", "child_out")},
        "machine": machine(), "model": asdict(spec), "model_fp32_mib": fp32_mib, "runs": cli_rows,
        "phases": phases, "measured_config": comparison, "breakdown": breakdown,
        "llama2_predictions": {"nsamples": 128, "seqlen": 2048, "batch": args.batch, "rows": large},
    })


if __name__ == "__main__":
    main()
