"""Text sources: the WikiText row rule, local files, the data mirror, evaluation streams and blocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from sparseheal.config import ConfigError
from sparseheal.data import eval_tokens, load_documents, training_blocks

REAL_DATA = Path(os.environ.get("SPARSEHEAL_REAL_DATA", "/work/shared/data"))


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def test_wikitext_rows_join_rule(tmp_path):
    root = tmp_path / "mirror"
    (root / "wikitext-2-raw-v1").mkdir(parents=True)
    raw = " \n = Title = \n \n First line .\n\n Second @-@ line .\n"
    (root / "wikitext-2-raw-v1" / "wiki.test.raw").write_text(raw)
    rows = load_documents("wikitext2", "test", str(root))
    # a blank line (one space, or empty) becomes ""; every other line keeps its newline
    assert rows == ["", " = Title = \n", "", " First line .\n", "", " Second @-@ line .\n"]


def test_wikitext_eval_stream_is_joined_rows(tokenizer, data_dir):
    raw = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_text()
    rows = ["" if line.strip() == "" else line + "\n" for line in raw.split("\n")[:-1]]
    expected = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids
    tokens = eval_tokens("wikitext2", tokenizer, 32)
    assert tokens.shape[0] == 1 and torch.equal(tokens, expected)


@pytest.mark.skipif(not (REAL_DATA / "wikitext-2-raw-v1").is_dir(), reason="no shared data mirror")
def test_real_wikitext_rows_match_hf_split():
    rows = load_documents("wikitext2", "test", str(REAL_DATA))
    assert len(rows) == 4358  # the row count of HF wikitext-2-raw-v1 test
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(r == "" for r in rows) > 1000 and all(r == "" or r.endswith("\n") for r in rows)


def test_c4_mirror_train_and_validation(data_dir, tokenizer):
    train = load_documents("c4", "train", str(data_dir))
    with open(data_dir / "c4-en" / "c4_train_00000_first1000.jsonl") as fh:
        assert train == [json.loads(line)["text"] for line in fh]  # documents in file order
    val = load_documents("c4", "validation", str(data_dir))
    assert val == pq.read_table(data_dir / "c4-en" / "c4_validation_2k.parquet").column("text").to_pylist()
    seqlen = 16
    stream = eval_tokens("c4", tokenizer, seqlen)
    full = tokenizer(" ".join(val[:1100]), return_tensors="pt").input_ids
    assert torch.equal(stream, full[:, : 256 * seqlen])
    assert stream.shape[1] == min(full.shape[1], 256 * seqlen)


def test_mirror_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SPARSEHEAL_DATA_DIR", str(data_dir))
    assert load_documents("wikitext2", "test") == load_documents("wikitext2", "test", str(data_dir))


def _write_local(tmp_path: Path) -> dict[str, Path]:
    paths = {"txt": tmp_path / "a.txt", "jsonl": tmp_path / "b.jsonl", "parquet": tmp_path / "c.parquet"}
    paths["txt"].write_text("one whole document\nwith two lines\n")
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "x": 1})]
    paths["jsonl"].write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": ["p1", "p2", "p3"], "id": [1, 2, 3]}), paths["parquet"])
    return paths


def test_local_files_and_directory(tmp_path):
    paths = _write_local(tmp_path)
    assert load_documents(str(paths["txt"]), "train") == ["one whole document\nwith two lines\n"]
    assert load_documents(str(paths["jsonl"]), "train") == ["first", "second"]
    assert load_documents(str(paths["parquet"]), "train") == ["p1", "p2", "p3"]
    (tmp_path / "ignored.csv").write_text("a,b\n")
    nested = tmp_path / "sub"
    nested.mkdir()
    (nested / "d.txt").write_text("nested")
    # a directory: every supported file, sorted by path
    docs = load_documents(str(tmp_path), "train")
    assert docs == ["one whole document\nwith two lines\n", "first", "second", "p1", "p2", "p3", "nested"]


def test_local_text_eval_stream(tmp_path, tokenizer):
    paths = _write_local(tmp_path)
    stream = eval_tokens(str(paths["jsonl"]), tokenizer, 8)
    assert torch.equal(stream, tokenizer("first\n\nsecond", return_tensors="pt").input_ids)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", b"", "contains no text"),
        ("blank.txt", b"  \n\n\t\n", "contains no text"),
        ("binary.txt", bytes(range(256)) * 4, "not readable text"),
        ("binary.jsonl", b"\xff\xfe\x00garbage\x80\n", "not readable text"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "not readable text"),
        ("notext.jsonl", b'{"content": "no text field"}\n', "not readable text"),
        ("nulls.jsonl", b'{"text": ""}\n{"text": "  "}\n', "contains no text"),
        ("broken.parquet", b"PAR1 this is not parquet", "not readable text"),
    ],
)
def test_bad_local_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_documents(str(path), "train", flag="--calibration-data")
    assert err.value.flag == "--calibration-data"
    assert message in err.value.message and name in err.value.message


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match="not readable text"):
        load_documents(str(tmp_path / "t.parquet"), "train")


def test_missing_unknown_and_empty_sources(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_documents("wikitext3", "test", flag="--dataset")
    assert err.value.flag == "--dataset" and "wikitext2, c4, ptb" in err.value.message
    with pytest.raises(ConfigError, match="does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(ConfigError, match="does not exist"):
        load_documents(str(tmp_path / "nope" / "dir"), "train")
    (tmp_path / "only.csv").write_text("a\n")
    with pytest.raises(ConfigError, match="holds no"):
        load_documents(str(tmp_path), "train")
    with pytest.raises(ConfigError, match="unsupported file type"):
        load_documents(str(tmp_path / "only.csv"), "train")


def test_training_blocks_concatenate_and_chunk(tokenizer):
    docs = ["the model prunes weights", "and heals them", "while every pruned weight stays exactly zero"]
    stream = [t for d in docs for t in tokenizer(d).input_ids]
    blocks = training_blocks(docs, tokenizer, 4)
    assert blocks.shape == (len(stream) // 4, 4) and blocks.dtype == torch.long
    assert blocks.reshape(-1).tolist() == stream[: blocks.numel()]
    assert training_blocks(docs, tokenizer, 4, max_blocks=2).tolist() == blocks[:2].tolist()
    with pytest.raises(ConfigError) as err:
        training_blocks(docs, tokenizer, len(stream) + 1, flag="--data")
    assert err.value.flag == "--data" and "fewer than one block" in err.value.message


def test_mirror_miss_falls_back_to_hub_or_says_both(data_dir, monkeypatch, caplog):
    import sparseheal.data as data_module

    def unreachable(name, split, flag):
        try:
            raise ConnectionError("offline")
        except ConnectionError as err:
            raise ConfigError(flag, f"cannot load {name}/{split} from the Hub (ConnectionError)") from err

    monkeypatch.setattr(data_module, "_hub_documents", unreachable)
    with pytest.raises(ConfigError) as err:  # the tiny mirror has no wikitext2 train split
        load_documents("wikitext2", "train", str(data_dir), flag="--calibration-data")
    assert err.value.flag == "--calibration-data"
    assert str(data_dir) in err.value.message and "wiki.train.raw" in err.value.message
    assert "ConnectionError" in err.value.message

    monkeypatch.setattr(data_module, "_hub_documents", lambda name, split, flag: ["from the hub"])
    with caplog.at_level("WARNING", logger="sparseheal.data"):
        assert load_documents("wikitext2", "train", str(data_dir)) == ["from the hub"]
    assert "not in the mirror" in caplog.text
