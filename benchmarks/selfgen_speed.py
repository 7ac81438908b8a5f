"""Speed of ``--data self`` generation: the dense model writing its own training text.

For each batch size, the same prompts are continued twice with the same seed: once by sparseheal's
sampler (``NucleusSampling``: the nucleus from a top-k over 4096 candidates) and once by ``generate``'s
own top-p, which sorts the whole vocabulary at every step. Reports tokens/s for both and whether the
two wrote the same tokens.

    python benchmarks/selfgen_speed.py                          # smollm2-135m, batches 16 and 64
    python benchmarks/selfgen_speed.py --batches 16 --sequences 16 --length 16   # a short check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, print_table, write_json  # noqa: E402


def generate_with_sort(model, prompts: torch.Tensor, length: int, temperature: float, top_p: float, seed: int,
                       eos_token_id: int | None, batch_size: int) -> torch.Tensor:
    """The reference: ``generate``'s own temperature and top-p warpers, same batches and RNG fork."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                              max_new_tokens=length, min_new_tokens=length, eos_token_id=eos_token_id,
                              pad_token_id=eos_token_id if eos_token_id is not None else 0, use_cache=True)
    rows = []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]  # (b, P)
            mask = torch.ones_like(batch)
            out = model.generate(input_ids=batch, attention_mask=mask, generation_config=config)
            rows.append(out[:, : batch.shape[1] + length])  # (b, P + length)
    return torch.cat(rows)


def timed(fn, *args, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="16,64", help="comma-separated --self-batch-size values")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_results/selfgen_speed.json")
    args = parser.parse_args()

    from sparseheal.heal.selfgen import NUCLEUS_CANDIDATES, sample_sequences, start_tokens
    from sparseheal.models import load_model

    model, tokenizer, _ = load_model(args.model, "float32", "cpu")
    model.eval()
    prompts = start_tokens(tokenizer, args.sequences, args.seed, model.get_input_embeddings().weight.shape[0])
    sampling = (args.length, args.temperature, args.top_p, args.seed, tokenizer.eos_token_id)
    tokens = args.sequences * args.length
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ours, ours_s = timed(sample_sequences, model, prompts, *sampling, batch_size=batch)
        ref, ref_s = timed(generate_with_sort, model, prompts, *sampling, batch_size=batch)
        rows.append({"batch": batch, "tokens": tokens, "sort_s": round(ref_s, 1), "topk_s": round(ours_s, 1),
                     "sort_tokens_per_s": round(tokens / ref_s, 1),
                     "topk_tokens_per_s": round(tokens / ours_s, 1), "speedup": round(ref_s / ours_s, 2),
                     "same_tokens": bool(torch.equal(ours, ref))})
        print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    write_json(Path(args.output), {"settings": vars(args), "candidates": NUCLEUS_CANDIDATES,
                                   "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
