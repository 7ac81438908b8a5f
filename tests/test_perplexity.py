"""Wanda-protocol perplexity against a computation written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sparseheal.config import ConfigError
from sparseheal.data import eval_tokens
from sparseheal.evaluate.perplexity import perplexity, window_losses
from sparseheal.models import load_model


@pytest.fixture(scope="module")
def lm_and_tokens(llama_dir, data_dir):
    lm, tokenizer, _ = load_model(str(llama_dir), device="cpu")
    tokens = eval_tokens("wikitext2", tokenizer, 32, str(data_dir))
    return lm, tokens[:, : 32 * 9 + 11]  # nine windows of 32 and a tail


def _by_hand(lm, tokens: torch.Tensor, seqlen: int, windows: int | None = None) -> tuple[float, int]:
    """exp(mean over windows of the mean next-token negative log-likelihood), one window at a time."""
    n = tokens.shape[1] // seqlen if windows is None else windows
    window_means = []
    with torch.no_grad():
        for w in range(n):
            ids = tokens[:, w * seqlen : (w + 1) * seqlen]
            logprobs = torch.log_softmax(lm(input_ids=ids).logits.double(), dim=-1)[0]  # (T, V)
            nll = [-float(logprobs[t, ids[0, t + 1]]) for t in range(seqlen - 1)]
            window_means.append(sum(nll) / len(nll))
    return math.exp(sum(window_means) / len(window_means)), n


def test_perplexity_equals_hand_computation(lm_and_tokens):
    lm, tokens = lm_and_tokens
    seqlen = 32
    assert tokens.shape[1] % seqlen != 0  # the tail shorter than a window exists and is dropped
    expected, n = _by_hand(lm, tokens, seqlen)
    result = perplexity(lm, tokens, "wikitext2", seqlen)
    assert result.ppl == pytest.approx(expected, rel=1e-6)
    assert result.windows == n == tokens.shape[1] // seqlen
    assert result.tokens == n * seqlen and result.seqlen == seqlen
    assert (result.dataset, result.protocol, result.dtype) == ("wikitext2", "wanda", "float32")


def test_max_windows_takes_the_first_windows(lm_and_tokens):
    lm, tokens = lm_and_tokens
    expected, _ = _by_hand(lm, tokens, 24, windows=5)
    result = perplexity(lm, tokens, "wikitext2", 24, max_windows=5)
    assert result.windows == 5 and result.tokens == 120
    assert result.ppl == pytest.approx(expected, rel=1e-6)
    everything = perplexity(lm, tokens, "wikitext2", 24, max_windows=10**6)
    assert everything.windows == tokens.shape[1] // 24


@pytest.mark.parametrize("max_windows", [None, 7])
def test_batch_size_does_not_change_result(lm_and_tokens, max_windows):
    lm, tokens = lm_and_tokens
    one = perplexity(lm, tokens, "wikitext2", 32, max_windows=max_windows, batch_size=1)  # 9 or 7 windows
    three = perplexity(lm, tokens, "wikitext2", 32, max_windows=max_windows, batch_size=3)  # partial batch
    assert one.windows == three.windows
    assert abs(one.ppl - three.ppl) <= 1e-5 * one.ppl
    losses1 = window_losses(lm, tokens, 32, max_windows, 1)
    losses3 = window_losses(lm, tokens, 32, max_windows, 3)
    torch.testing.assert_close(losses1, losses3, rtol=1e-5, atol=1e-6)


def test_window_losses_shape_and_mode_restored(lm_and_tokens):
    lm, tokens = lm_and_tokens
    lm.train()
    try:
        perplexity(lm, tokens, "wikitext2", 16, max_windows=2)
        assert lm.training  # the caller's mode is restored
    finally:
        lm.eval()
    losses = window_losses(lm, tokens, 16, max_windows=3)
    assert losses.shape == (3,) and losses.dtype == torch.float32 and (losses > 0).all()


def test_seqlen_longer_than_stream(lm_and_tokens):
    lm, tokens = lm_and_tokens
    with pytest.raises(ConfigError) as err:
        perplexity(lm, tokens[:, :20], "tiny", 32)
    assert err.value.flag == "--seqlen" and "20 tokens" in err.value.message


def test_low_precision_dtype_recorded(llama_dir, lm_and_tokens):
    _, tokens = lm_and_tokens
    lm, _, _ = load_model(str(llama_dir), dtype="bfloat16", device="cpu")
    result = perplexity(lm, tokens, "wikitext2", 32, max_windows=2)
    assert result.dtype == "bfloat16" and math.isfinite(result.ppl)


def test_window_loss_in_chunks_equals_one_call_bit_for_bit(monkeypatch):
    import torch.nn.functional as F

    from sparseheal.evaluate import perplexity as module

    logits = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(1))  # (B, T, V)
    inputs = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(2))
    whole = F.cross_entropy(logits[:, :-1].reshape(-1, 96), inputs[:, 1:].reshape(-1), reduction="none")
    monkeypatch.setattr(module, "_CHUNK_BYTES", 4 * 96 * 7)  # 7 rows per call: 17 calls, the last one short
    assert torch.equal(module._window_loss(logits, inputs), whole.view(3, 39).mean(dim=1))
