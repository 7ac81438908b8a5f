"""The evaluate stage's work, after its preflight: token streams from the tokenizer alone -> the model
(with its adapter) -> perplexity per data set -> zero-shot tasks -> the report."""

from __future__ import annotations

import contextlib

import torch

from sparseheal.data import eval_tokens
from sparseheal.errors import ConfigError
from sparseheal.evaluate.perplexity import PerplexitySettings, perplexity
from sparseheal.evaluate.zeroshot import ZeroShotSettings, prepare_tasks, run_zeroshot
from sparseheal.models import (
    ComputeSettings,
    TrustSettings,
    check_positions,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_source,
)
from sparseheal.records import Stopwatch, peak_rss_mb

__all__ = ["eval_streams", "run_evaluate"]


def eval_streams(model: str, ppl: PerplexitySettings,
                 data_dir: str | None) -> tuple[int, dict[str, torch.Tensor]]:
    """The window length and each data set's (1, N) token stream, from the config and tokenizer alone."""
    config = load_config(model)
    seqlen = ppl.seqlen or min(2048, max_positions(config) or 2048)
    check_positions(config, seqlen, "--seqlen")
    tokenizer = load_tokenizer(resolve_source(model))
    streams = {}
    for name in ppl.datasets:
        streams[name] = eval_tokens(name, tokenizer, seqlen, data_dir)  # (1, N)
        if streams[name].shape[1] < seqlen:
            n_tokens = streams[name].shape[1]
            raise ConfigError("--seqlen", f"{seqlen} is longer than the {name} stream ({n_tokens} tokens)")
    return seqlen, streams


def run_evaluate(model: str, adapter: str | None, ppl: PerplexitySettings, zeroshot: ZeroShotSettings,
                 compute: ComputeSettings, trust: TrustSettings, data_dir: str | None) -> dict:
    """Evaluates ``model`` (see ``sparseheal.api.evaluate``); returns the report."""
    watch = Stopwatch()
    with contextlib.ExitStack() as stack:
        tasks = zeroshot.task_list
        zs_tasks = stack.enter_context(prepare_tasks(tasks, data_dir)) if tasks else None
        seqlen, streams = eval_streams(model, ppl, data_dir)  # tokenized before the weights load
        with watch("load"):
            lm, tokenizer, _ = load_model(model, compute.dtype, compute.device, trust.trust_remote_code,
                                          trust.allow_pickle)
        if adapter:
            from sparseheal.heal.adapters import apply_adapter

            lm = apply_adapter(lm, adapter, model, trust.allow_pickle)
        results = []
        with watch("perplexity"):
            for name, tokens in streams.items():
                result = perplexity(lm, tokens, name, seqlen, ppl.max_windows, ppl.batch_size)
                results.append(result.to_dict())
        report = {"model": model, "adapter": adapter, "results": results}
        if zs_tasks is not None:
            with watch("zeroshot"):
                report["zeroshot"] = run_zeroshot(lm, tokenizer, zs_tasks, zeroshot.limit, ppl.batch_size)
    report.update(timings=watch.times, peak_rss_mb=round(peak_rss_mb(), 1))
    return report
