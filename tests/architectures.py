"""Tiny configs of the architectures the suite runs end to end (2 layers, dimensions divisible by 8).

Each is built from transformers' own config class for its model type. Sliding windows are 16 tokens, so
any calibration or evaluation window longer than that gives sliding and full attention layers different
masks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import VOCAB, build_tokenizer

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, bos_token_id=0,
               eos_token_id=0, pad_token_id=0)
_MOE = dict(num_experts_per_tok=2)

# model type -> config overrides; the comment says what each case covers
ARCHITECTURES: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=True),  # tied embeddings
    "mistral": dict(sliding_window=16, tie_word_embeddings=False),  # untied
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),  # layer_types mixed
    "qwen3": dict(head_dim=16),
    "gemma2": dict(sliding_window=16, head_dim=16),  # sliding / full alternating
    "gemma3_text": dict(sliding_window=16, head_dim=16, sliding_window_pattern=2),  # local / global RoPE
    "phi3": dict(pad_token_id=0),  # fused qkv_proj and gate_up_proj
    "falcon": dict(),  # fused query_key_value
    "bloom": dict(n_embed=64, n_layer=2, n_head=4),  # fused query_key_value, ALiBi
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),  # Conv1D
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "gpt_neox": dict(),
    "phi": dict(),
    "olmo2": dict(),
    "stablelm": dict(),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    "lfm2": dict(layer_types=["conv", "full_attention"]),  # a short-convolution layer (3-D conv weight)
    "mixtral": dict(num_local_experts=4, **_MOE),  # fused experts, stored per expert on disk
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64, **_MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, head_dim=16, **_MOE),
    "olmoe": dict(num_experts=4, **_MOE),
    "gpt_oss": dict(num_local_experts=4, head_dim=16, sliding_window=16, **_MOE),  # experts (E, in, out)
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
MIXED_ATTENTION = ("qwen2", "gemma2", "gemma3_text", "gpt_oss")


def arch_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_COMMON, **ARCHITECTURES[model_type]})


def make_arch_dir(path: Path, model_type: str, seed: int = 0) -> Path:
    """Saves a randomly initialised tiny model of ``model_type`` with the tiny tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(model_type))
    model.save_pretrained(path)
    build_tokenizer(path)
    return path
