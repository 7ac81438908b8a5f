"""Applying a PEFT adapter to a loaded base model for evaluation."""

from __future__ import annotations

from torch import nn

from sparseheal.config import ConfigError
from sparseheal.models import resolve_source, source_hash
from sparseheal.records import read_record

__all__ = ["apply_adapter"]


def apply_adapter(model: nn.Module, adapter: str, base: str) -> nn.Module:
    """Wraps ``model`` with the PEFT adapter in ``adapter`` after checking it was trained on ``base``.

    The adapter's sparseheal.json names the hash of its base weights; a mismatch is refused.
    """
    from peft import PeftModel

    record = read_record(adapter) or {}
    expected = record.get("base_hash")
    if expected is not None:
        actual = source_hash(resolve_source(base))
        if actual != expected:
            raise ConfigError(
                "--adapter",
                f"{adapter} was trained on base weights {expected}, but {base} has weights {actual}",
            )
    try:
        wrapped = PeftModel.from_pretrained(model, adapter)
    except (ValueError, OSError) as err:
        raise ConfigError("--adapter", f"{adapter} is not a PEFT adapter directory ({err})") from err
    return wrapped.eval()
