"""Property tests (hypothesis): the N:M pattern parser, the --config file parser, and mask selection."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseheal import cli
from sparseheal.config import ConfigError
from sparseheal.sparsity.base import parse_pattern, resolve_sparsity
from sparseheal.sparsity.masks import (
    MAX_GROUP,
    nm_mask,
    nm_violations,
    pack_mask,
    unpack_mask,
    unstructured_mask,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nm_pairs(draw, max_m: int = 64) -> tuple[int, int]:
    m = draw(st.integers(2, max_m))
    return draw(st.integers(1, m - 1)), m


@FAST
@given(nm_pairs(MAX_GROUP), st.sampled_from(["{}:{}", " {} : {} ", "{}:{}\n", "\t{}:  {}"]))
def test_valid_nm_round_trips(pair, template):
    n, m = pair
    assert parse_pattern(template.format(n, m)) == (n, m)
    assert resolve_sparsity((n, m), None) == pytest.approx(1 - n / m)
    assert resolve_sparsity((n, m), 1 - n / m) == pytest.approx(1 - n / m)


@FAST
@given(st.integers(MAX_GROUP + 1, 10**9))
def test_groups_wider_than_the_bound_are_refused(m):
    with pytest.raises(ConfigError) as err:
        parse_pattern(f"1:{m}")
    assert err.value.flag == "--pattern" and str(MAX_GROUP) in err.value.message


@FAST
@given(st.sampled_from(["unstructured", "UNSTRUCTURED", " Unstructured ", "unstructured\n"]))
def test_unstructured_spellings(text):
    assert parse_pattern(text) is None


@FAST
@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_impossible_nm_rejected(n, m):
    if 0 < n < m:
        return
    with pytest.raises(ConfigError) as err:
        parse_pattern(f"{n}:{m}")
    assert err.value.flag == "--pattern" and "0 < N < M" in err.value.message


@FAST
@given(st.text(max_size=20))
def test_any_text_parses_or_names_pattern(text):
    """Arbitrary input either parses to a valid pattern or raises ConfigError naming --pattern."""
    try:
        result = parse_pattern(text)
    except ConfigError as err:
        assert err.flag == "--pattern" and str(err).startswith("--pattern: ")
        return
    if result is not None:
        n, m = result
        assert 0 < n < m and re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", text)
    else:
        assert text.strip().lower() == "unstructured"


@FAST
@given(nm_pairs(16), st.floats(0.0, 0.999))
def test_explicit_other_ratio_rejected(pair, sparsity):
    n, m = pair
    if abs(sparsity - (1 - n / m)) <= 1e-9:
        return
    with pytest.raises(ConfigError) as err:
        resolve_sparsity((n, m), sparsity)
    assert err.value.flag == "--sparsity"


@FAST
@given(st.integers(1, 9), st.integers(1, 70), nm_pairs(12), st.integers(0, 2**31 - 1), st.booleans())
def test_nm_mask_always_valid(rows, cols, pair, seed, ties):
    n, m = pair
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, cols), generator=gen).float() if ties else torch.randn(rows, cols,
                                                                                               generator=gen)
    mask = nm_mask(scores, n, m)
    assert mask.shape == (rows, cols) and mask.dtype == torch.bool
    assert nm_violations(mask, n, m) == 0
    full = cols // m
    if full:
        assert (mask[:, : full * m].reshape(rows, full, m).sum(-1) == n).all()
    tail = cols - full * m
    if tail:
        assert (mask[:, full * m :].sum(-1) == min(n, tail)).all()
    assert torch.equal(mask, nm_mask(scores, n, m))  # deterministic


@FAST
@given(st.integers(1, 9), st.integers(1, 70), st.floats(0.0, 0.9999), st.integers(0, 2**31 - 1),
       st.booleans(), st.booleans())
def test_unstructured_counts_exact(rows, cols, sparsity, seed, per_row, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 2, (rows, cols), generator=gen).float() if ties else torch.rand(rows, cols,
                                                                                              generator=gen)
    mask = unstructured_mask(scores, sparsity, per_row)
    if per_row:
        assert ((~mask).sum(1) == math.floor(cols * sparsity)).all()
    else:
        assert int((~mask).sum()) == math.floor(rows * cols * sparsity)
    kept, pruned = scores[mask], scores[~mask]
    if per_row:
        for r in range(rows):
            row_kept, row_pruned = scores[r][mask[r]], scores[r][~mask[r]]
            if row_kept.numel() and row_pruned.numel():
                assert row_pruned.max() <= row_kept.min()
    elif kept.numel() and pruned.numel():
        assert pruned.max() <= kept.min()


@FAST
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_pack_round_trip(shape, seed):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    assert torch.equal(unpack_mask(pack_mask(mask), tuple(shape)), mask)


# --- the --config file parser -----------------------------------------------------------------------------

_PRUNE = typer.main.get_command(cli.app).commands["prune"]
_KNOWN = {p.name for p in _PRUNE.params if p.name != "config"}
_VALUES = {
    "method": st.sampled_from(["wanda", "sparsegpt", "magnitude"]),
    "pattern": st.sampled_from(["unstructured", "2:4", "4:8"]),
    "calibration_data": st.sampled_from(["c4", "wikitext2", "data/x.jsonl"]),
    "nsamples": st.integers(1, 4096),
    "seqlen": st.integers(1, 8192),
    "seed": st.integers(0, 2**31 - 1),
    "calibration_batch_size": st.integers(1, 64),
    "sparsity": st.floats(0.0, 0.99),
    "overwrite": st.booleans(),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
}


def _parse(config: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(config))
        return _PRUNE.make_context("prune", ["model", "-o", "out", "--config", str(path)]).params


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_VALUES)), st.just(None), max_size=len(_VALUES)).flatmap(
    lambda keys: st.fixed_dictionaries({k: _VALUES[k] for k in keys})), st.randoms())
def test_config_values_arrive_in_either_spelling(values, rnd):
    config = {(k.replace("_", "-") if rnd.random() < 0.5 else k): v for k, v in values.items()}
    params = _parse(config)
    for key, value in values.items():
        assert params[key] == pytest.approx(value) if isinstance(value, float) else params[key] == value


@settings(max_examples=60, deadline=None)
@given(st.from_regex(r"[a-z][a-z_\-]{0,20}", fullmatch=True))
def test_config_unknown_keys_named(key):
    if key.replace("-", "_") in _KNOWN:
        return
    with pytest.raises(ConfigError) as err:
        _parse({key: 1})
    assert key in err.value.flag and "unknown key" in err.value.message and "valid:" in err.value.message
