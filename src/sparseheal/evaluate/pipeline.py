"""The evaluate stage's work, after its preflight: each evaluation prepares what it needs from the
tokenizer alone (token streams, tasks) -> the model loads once (with its adapter) -> each evaluation
runs on it -> the report."""

from __future__ import annotations

import contextlib

from sparseheal.evaluate.base import Evaluator
from sparseheal.models import ComputeSettings, TrustSettings, load_model
from sparseheal.records import Stopwatch, peak_rss_mb

__all__ = ["run_evaluate"]


def run_evaluate(model: str, adapter: str | None, evaluations: list[Evaluator], batch_size: int,
                 compute: ComputeSettings, trust: TrustSettings) -> dict:
    """Evaluates ``model`` (see ``sparseheal.api.evaluate``); returns the report, each evaluation's
    result under its ``key``."""
    watch = Stopwatch()
    wanted = [e for e in evaluations if e.wanted()]
    with contextlib.ExitStack() as stack:
        for evaluation in wanted:  # before the weights load: a bad data set or task costs no load
            evaluation.prepare(model, stack)
        with watch("load"):
            lm, tokenizer, _ = load_model(model, compute.dtype, compute.device, trust.trust_remote_code,
                                          trust.allow_pickle)
        if adapter:
            from sparseheal.heal.adapters import apply_adapter

            lm = apply_adapter(lm, adapter, model, trust.allow_pickle)
        report = {"model": model, "adapter": adapter}
        for evaluation in wanted:
            with watch(evaluation.name):
                report[evaluation.key] = evaluation.run(lm, tokenizer, batch_size)
    report.update(timings=watch.times, peak_rss_mb=round(peak_rss_mb(), 1))
    return report
