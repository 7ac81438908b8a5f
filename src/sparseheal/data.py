"""Text sources -> token tensors: calibration samples, training blocks and evaluation streams.

Named sets (``wikitext2``, ``c4``, ``ptb``) resolve to files under ``$SPARSEHEAL_DATA_DIR`` (or
``--data-dir``) when it is set, else to the Hugging Face Hub, with the same splits and text either way.
Local ``.txt`` (one document per file), ``.jsonl`` (field ``text``) and ``.parquet`` (column ``text``)
files, or a directory of them, work anywhere a data set name does.
"""

from __future__ import annotations

import json
import logging
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from sparseheal.errors import ConfigError
from sparseheal.settings import Settings, setting

__all__ = [
    "protected_inputs",
    "DataSettings",
    "NAMED_SETS",
    "data_root",
    "load_documents",
    "check_source",
    "calibration_samples",
    "eval_tokens",
    "training_blocks",
    "split_blocks",
    "blocks_from_sequences",
    "training_split",
]

log = logging.getLogger(__name__)

NAMED_SETS = ("wikitext2", "c4", "ptb")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
_MIRROR = {
    ("wikitext2", "test"): "wikitext-2-raw-v1/wiki.test.raw",
    ("wikitext2", "validation"): "wikitext-2-raw-v1/wiki.valid.raw",
    ("wikitext2", "train"): "wikitext-2-raw-v1/wiki.train.raw",
    ("c4", "train"): "c4-en/c4_train_*.jsonl",
    ("c4", "validation"): "c4-en/c4_validation_*.parquet",
}


@dataclass
class DataSettings(Settings):
    """Where the named data sets are read from."""

    data_dir: str | None = setting(None, "local mirror of the named data sets (default "
                                         "$SPARSEHEAL_DATA_DIR).",
                                   resumable=True)


def data_root(data_dir: str | None = None) -> Path | None:
    """The local mirror directory: ``data_dir``, else ``$SPARSEHEAL_DATA_DIR``, else None."""
    root = data_dir or os.environ.get("SPARSEHEAL_DATA_DIR")
    return Path(root).expanduser() if root else None


def protected_inputs(data_dir: str | None = None) -> list[tuple[str, str]]:
    """What every command reads besides its arguments, never a valid output: the data mirror behind the
    named data sets (``--data-dir`` or ``$SPARSEHEAL_DATA_DIR``) and the cache that holds the built-in
    model's conversion. As ``(what, path)`` pairs for :func:`~sparseheal.checks.check_not_an_input`."""
    from sparseheal.sources import cache_dir

    root = data_root(data_dir)
    found = [("--data-dir" if data_dir else "$SPARSEHEAL_DATA_DIR", str(root))] if root is not None else []
    return found + [("the model cache ($SPARSEHEAL_CACHE)", str(cache_dir()))]


def _wikitext_rows(raw: str) -> list[str]:
    """Rows of the HF ``wikitext-2-raw-v1`` split from the raw file: a line keeps its newline,
    a blank line (a single space) becomes ""."""
    return ["" if not line.strip() else line for line in raw.splitlines(keepends=True)]


def _read_file(path: Path, flag: str) -> list[str]:
    try:
        if path.suffix == ".raw":
            return _wikitext_rows(path.read_text(encoding="utf-8"))
        if path.suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line)["text"] for line in fh if line.strip()]
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return [str(t) for t in pq.read_table(path, columns=["text"]).column("text").to_pylist()]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, OSError, ValueError) as err:
        reason = type(err).__name__
        message = f"{path} is not readable text ({reason}); expected UTF-8 with a 'text' field"
        raise ConfigError(flag, message) from err
    raise ConfigError(flag, f"{path}: unsupported file type; use {', '.join(_LOCAL_SUFFIXES)}")


def _local_documents(path: Path, flag: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_SUFFIXES) if path.is_dir() else [path]
    for file in files:  # a device or a pipe behind a data file's name would never end
        try:
            mode = file.stat().st_mode
        except OSError as err:
            raise ConfigError(flag, f"{file} cannot be read ({err.strerror or type(err).__name__})") from err
        if not stat.S_ISREG(mode):
            raise ConfigError(flag, f"{file} is not a regular file (a device, pipe or socket, or a link to "
                                    "one); give a text file")
    if not files:
        raise ConfigError(flag, f"{path} holds no {', '.join(_LOCAL_SUFFIXES)} files")
    docs = [doc for f in files for doc in _read_file(f, flag)]
    if not any(doc.strip() for doc in docs):
        raise ConfigError(flag, f"{path} contains no text")
    return docs


def _hub_documents(name: str, split: str, flag: str) -> list[str]:
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        if name == "ptb":
            return list(load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"])
        shard = "en/c4-train.00000-of-01024.json.gz"
        if split != "train":
            shard = "en/c4-validation.00000-of-00008.json.gz"
        return list(load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"])
    except Exception as err:  # the Hub is unreachable or the set is missing
        raise ConfigError(
            flag,
            f"cannot load {name}/{split} from the Hub ({type(err).__name__}); "
            "set SPARSEHEAL_DATA_DIR to a local mirror",
        ) from err


def load_documents(source: str, split: str, data_dir: str | None = None, flag: str = "--data") -> list[str]:
    """Returns the documents of a named set's split, or of a local file or directory.

    Args:
        source: ``wikitext2``, ``c4``, ``ptb``, or a path.
        split: ``train``, ``validation`` or ``test`` (named sets only).
        data_dir: local mirror root (default ``$SPARSEHEAL_DATA_DIR``).
        flag: the flag to name in errors.
    """
    path = Path(source).expanduser()
    if path.suffix in _LOCAL_SUFFIXES or path.exists() or os.sep in source:
        if not path.exists():
            raise ConfigError(flag, f"{source} does not exist")
        return _local_documents(path, flag)
    if source not in NAMED_SETS:
        choices = ", ".join(NAMED_SETS)
        raise ConfigError(flag, f"unknown data set {source!r}; choose from {choices} or a file path")
    root = data_root(data_dir)
    pattern = _MIRROR.get((source, split))
    if root is not None and pattern is not None:
        files = sorted(root.glob(pattern))
        if files:
            return [doc for f in files for doc in _read_file(f, flag)]
    if root is None:
        return _hub_documents(source, split, flag)
    try:  # the mirror lacks this split: the Hub may still have it
        docs = _hub_documents(source, split, flag)
    except ConfigError as err:
        cause = type(err.__cause__).__name__
        raise ConfigError(flag, f"{source}/{split} is not in the mirror {root} ({pattern}) and the Hub "
                                f"cannot serve it ({cause}); add it to the mirror or go online") from err
    log.warning("%s/%s is not in the mirror %s; loaded it from the Hub", source, split, root)
    return docs


def check_source(source: str, flag: str = "--data") -> None:
    """Fails fast when ``source`` cannot give text: an unknown name, a missing path, files without text.

    Named sets are only checked by name (they are read when used); local files are read now.
    """
    if source in NAMED_SETS and not Path(source).expanduser().exists():
        return
    load_documents(source, "test", None, flag)


TOKENIZE_PIECE = 8 * 2**20  # characters tokenized in one call; longer texts go in pieces


def token_ids(tokenizer, text: str) -> list[int]:
    """``tokenizer(text).input_ids``, tokenized in pieces of at most :data:`TOKENIZE_PIECE` characters
    (cut at a space where there is one) so that one huge line cannot exhaust the tokenizer; special tokens
    only at the start. Texts up to a piece (every named set's) are tokenized in one call, as before."""
    if len(text) <= TOKENIZE_PIECE:
        return list(tokenizer(text).input_ids)
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(start + TOKENIZE_PIECE, len(text))
        if end < len(text):
            space = text.rfind(" ", start + TOKENIZE_PIECE // 2, end)
            end = space if space > start else end
        ids += tokenizer(text[start:end], add_special_tokens=start == 0).input_ids
        start = end
    return ids


def calibration_samples(
    docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, flag: str = "--seqlen"
) -> torch.Tensor:
    """Draws calibration windows exactly as the Wanda/SparseGPT reference does.

    Seeds Python's ``random``; for each sample picks a document with ``randint(0, n_docs - 1)``,
    retries until it has more than ``seqlen`` tokens, then takes the window starting at
    ``randint(0, n_tokens - seqlen - 1)``.

    Returns:
        (nsamples, seqlen) token ids.
    """
    lengths: dict[int, torch.Tensor] = {}

    def tokens(i: int) -> torch.Tensor:
        if i not in lengths:
            lengths[i] = torch.tensor(token_ids(tokenizer, docs[i]), dtype=torch.long)
        return lengths[i]

    rng = random.Random(seed)
    samples = []
    for _ in range(nsamples):
        while True:
            ids = tokens(rng.randint(0, len(docs) - 1))
            if ids.numel() > seqlen:
                break
            if len(lengths) == len(docs) and all(t.numel() <= seqlen for t in lengths.values()):
                longest = max(t.numel() for t in lengths.values())
                raise ConfigError(
                    flag, f"{seqlen} is longer than every calibration document (longest: {longest} tokens)"
                )
        start = rng.randint(0, ids.numel() - seqlen - 1)
        samples.append(ids[start : start + seqlen])
    return torch.stack(samples)  # (nsamples, seqlen)


def eval_tokens(dataset: str, tokenizer, seqlen: int, data_dir: str | None = None) -> torch.Tensor:
    """The evaluation token stream of the Wanda protocol.

    wikitext2: the test rows joined with "\\n\\n", tokenized once. c4: the first 1100 validation
    documents joined with " ", cut to 256 * seqlen tokens. ptb: test sentences joined with " ".
    A local file or directory: its documents joined with "\\n\\n".

    Returns:
        (1, N) token ids.
    """
    flag = "--dataset"
    if dataset == "c4":
        docs = load_documents("c4", "validation", data_dir, flag)[:1100]
        return torch.tensor([token_ids(tokenizer, " ".join(docs))], dtype=torch.long)[:, : 256 * seqlen]
    if dataset == "ptb":
        sentences = load_documents("ptb", "test", data_dir, flag)
        return torch.tensor([token_ids(tokenizer, " ".join(sentences))], dtype=torch.long)
    split = "test" if dataset == "wikitext2" else "train"
    docs = load_documents(dataset, split, data_dir, flag)
    return torch.tensor([token_ids(tokenizer, "\n\n".join(docs))], dtype=torch.long)


def training_blocks(
    docs: list[str], tokenizer, block_size: int, max_blocks: int | None = None, flag: str = "--data"
) -> torch.Tensor:
    """Tokenizes documents, concatenates them and cuts them into blocks, as HF's run_clm does.

    The remainder shorter than one block is dropped.

    Returns:
        (n_blocks, block_size) token ids.
    """
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * block_size
    for doc in docs:
        stream.extend(token_ids(tokenizer, doc))
        if needed is not None and len(stream) >= needed:
            break
    n_blocks = len(stream) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ConfigError(flag, f"the data has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).reshape(n_blocks, block_size)


def split_blocks(
    blocks: torch.Tensor, train_limit: int, max_eval: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Splits (N, T) blocks into a training head and a held-out evaluation tail.

    With enough data the tail is ``max_eval`` blocks; with less, it is the blocks beyond ``train_limit``
    or a tenth of the data, whichever is more (never more than ``max_eval``, never the only block).

    Returns:
        ((N - E, T) training blocks, (E, T) evaluation blocks or None when E = 0)
    """
    n = blocks.shape[0]
    n_eval = min(max_eval, max(n - train_limit, n // 10)) if n >= 2 else 0
    train_part = blocks[: n - n_eval][:train_limit]
    return train_part, (blocks[n - n_eval :] if n_eval > 0 else None)


def blocks_from_sequences(sequences: torch.Tensor, block_size: int,
                          max_blocks: int | None = None) -> torch.Tensor:
    """Concatenates (N, L) sequences and cuts them into (n_blocks, block_size); the remainder is dropped."""
    stream = sequences.reshape(-1)  # (N * L,)
    n_blocks = stream.numel() // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        count, length = sequences.shape
        raise ConfigError("--self-sequences", f"{count} sequences of {length} tokens make no block of "
                          f"{block_size}; raise --self-sequences or --self-length, or lower --block-size")
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size)


def training_split(source: str, tokenizer, block_size: int, max_train: int, max_eval: int,
                   data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training and held-out blocks of ``source``'s train split (run_clm style: tokenize, concatenate,
    chunk); only ``max_train + max_eval`` blocks are tokenized.

    Returns:
        ((N, block_size) training blocks, (E, block_size) held-out blocks or None)
    """
    docs = load_documents(source, "train", data_dir, "--data")
    blocks = training_blocks(docs, tokenizer, block_size, max_train + max_eval, "--data")
    train_part, eval_part = split_blocks(blocks, max_train, max_eval)
    log.info("data %s: %d training blocks and %d held-out blocks of %d tokens", source, len(train_part),
             0 if eval_part is None else len(eval_part), block_size)
    return train_part, eval_part
