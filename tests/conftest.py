"""Shared fixtures: tiny models of several architectures, a tiny tokenizer, and a tiny data mirror.

Everything is built from configs and synthetic text in seconds; nothing touches the Hub.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and the test machine's cores are shared.
torch.set_num_threads(1)

VOCAB = 256
WORDS = (
    "the model prunes weights and heals them while every pruned weight stays exactly zero "
    "a sparse network keeps half of its connections and learns again from text about rivers "
    "cities music history science and the quiet hills where people walk in the morning light"
).split()


def synthetic_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer with a 256-token vocabulary, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([synthetic_text(2000, s) for s in range(4)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(path)
    return fast


def tiny_config(arch: str):
    """Config of a tiny model (dimensions divisible by 8) for ``arch`` in llama, opt, gpt2, neox."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                          eos_token_id=0)
    if arch == "neox":
        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, bos_token_id=0,
                             eos_token_id=0)
    raise ValueError(arch)


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Saves a randomly initialised tiny model of ``arch`` with the tiny tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def make_data_dir(path: Path) -> Path:
    """A tiny mirror laid out like ``$SPARSEHEAL_DATA_DIR`` (wikitext2 test/valid, c4 train/validation)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wiki = path / "wikitext-2-raw-v1"
    wiki.mkdir(parents=True)
    lines = []
    for i in range(40):
        lines += [" ", f" = Section {i} = ", " ", " " + synthetic_text(60, 100 + i)]
    (wiki / "wiki.test.raw").write_text("\n".join(lines) + "\n")
    (wiki / "wiki.valid.raw").write_text("\n".join(lines[:40]) + "\n")
    c4 = path / "c4-en"
    c4.mkdir()
    with open(c4 / "c4_train_00000_first1000.jsonl", "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"text": synthetic_text(150 + 10 * (i % 7), i), "url": f"u{i}"}) + "\n")
    table = pa.table({"text": [synthetic_text(120, 1000 + i) for i in range(40)]})
    pq.write_table(table, c4 / "c4_validation_2k.parquet")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory, data_dir):
    """Points the data mirror at the tiny one and the cache at a temporary directory."""
    monkeypatch.setenv("SPARSEHEAL_DATA_DIR", str(data_dir))
    monkeypatch.setenv("SPARSEHEAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function ``arch -> directory`` that builds each tiny architecture once per session."""
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def pruned_llama(tmp_path_factory, llama_dir, data_dir) -> Path:
    """``llama_dir`` pruned with Wanda at 50% (read-only: copy it before changing anything)."""
    import sparseheal

    out = tmp_path_factory.mktemp("pruned") / "llama-wanda"
    return sparseheal.prune(str(llama_dir), str(out), method="wanda", nsamples=4, seqlen=32,
                            calibration_batch_size=2, data_dir=str(data_dir))
