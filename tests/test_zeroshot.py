"""Zero-shot evaluation through lm-evaluation-harness on local multiple-choice tasks (no Hub)."""

import json

import pytest
import torch
from conftest import build_tokenizer, synthetic_text, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparseheal
from sparseheal.cli import main
from sparseheal.config import ConfigError
from sparseheal.evaluate.zeroshot import summarize_results

N_QUESTIONS = 40


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    """A tiny LLaMA with larger initial weights, so its layers (not only the tied embeddings) shape
    its predictions and pruning them changes its answers."""
    path = tmp_path_factory.mktemp("sharp")
    config = tiny_config("llama")
    config.initializer_range = 0.1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    build_tokenizer(path)
    return path


@torch.no_grad()
def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """Sum of log p(continuation tokens | context), tokenized as lm-eval does (delimiter " ")."""
    whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
    n_ctx = len(tokenizer(context, add_special_tokens=False).input_ids)
    ids = torch.tensor([whole])  # (1, T)
    logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
    targets = ids[0, 1:]  # (T-1,)
    picked = logprobs.gather(1, targets[:, None])[:, 0]  # (T-1,)
    return picked[n_ctx - 1 :].sum().item()


def write_task(path, model, tokenizer) -> int:
    """Questions whose label is the choice ``model`` itself prefers (clear margins only)."""
    lines = []
    for i in range(4 * N_QUESTIONS):
        context = synthetic_text(8, 500 + i)
        choices = [synthetic_text(3, 9000 + 3 * i + k) for k in range(3)]
        scores = [choice_logprob(model, tokenizer, context, c) for c in choices]
        ranked = sorted(scores, reverse=True)
        if len(set(choices)) < 3 or ranked[0] - ranked[1] < 1e-2:
            continue
        lines.append(json.dumps({"context": context, "choices": choices, "label": scores.index(ranked[0])}))
        if len(lines) == N_QUESTIONS:
            break
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def test_local_task_scores_dense_perfectly_and_pruned_copy_worse(sharp_dir, tmp_path):
    llama_dir = sharp_dir
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    n = write_task(tmp_path / "prefs.jsonl", model, AutoTokenizer.from_pretrained(llama_dir))
    task = f"local:{tmp_path / 'prefs.jsonl'}"

    dense = sparseheal.evaluate(str(llama_dir), dataset="none", tasks=task)["zeroshot"]["local_prefs"]
    # the harness scores exactly what the independent log-likelihood computation preferred
    assert dense["acc"] == 1.0 and dense["n"] == n
    assert 0.0 <= dense["acc_norm"] <= 1.0

    pruned_dir = sparseheal.prune(str(llama_dir), str(tmp_path / "pruned"), method="magnitude", sparsity=0.95)
    pruned = sparseheal.evaluate(str(pruned_dir), dataset="none", tasks=task, limit=30)
    pruned = pruned["zeroshot"]["local_prefs"]
    assert pruned["n"] == 30
    assert 0.0 <= pruned["acc"] < 1.0 and 0.0 <= pruned["acc_norm"] <= 1.0


def test_adapter_is_applied(sharp_dir, tmp_path):
    llama_dir = sharp_dir
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(1)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    peft_model = get_peft_model(base, lora).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    write_task(tmp_path / "adapted.jsonl", peft_model, AutoTokenizer.from_pretrained(llama_dir))
    task = f"local:{tmp_path / 'adapted.jsonl'}"

    adapter = str(tmp_path / "adapter")
    with_adapter = sparseheal.evaluate(str(llama_dir), adapter=adapter, dataset="none", tasks=task)
    without = sparseheal.evaluate(str(llama_dir), dataset="none", tasks=task)
    assert with_adapter["zeroshot"]["local_adapted"]["acc"] == 1.0
    assert without["zeroshot"]["local_adapted"]["acc"] < 1.0


def test_task_directory_under_data_dir_and_cli_table(llama_dir, data_dir, tmp_path, capsys):
    task_dir = data_dir / "mc-demo"
    task_dir.mkdir(exist_ok=True)
    for part in range(2):
        rows = [{"context": synthetic_text(6, 70 + 10 * part + i), "choices": ["rivers", "music history"],
                 "label": i % 2} for i in range(5)]
        (task_dir / f"part{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(llama_dir), "--tasks", "local:mc-demo", "--seqlen", "32", "--max-windows", "2",
              "-o", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "zero-shot task" in printed and "local_mc_demo" in printed
    saved = json.loads(out.read_text())
    assert saved["zeroshot"]["local_mc_demo"]["n"] == 10
    assert saved["results"][0]["windows"] == 2


def test_unknown_task_names_the_flag(llama_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(llama_dir), "--tasks", "piqa,boolqq"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tasks" in err and "'boolqq'" in err and "boolq" in err


@pytest.mark.parametrize(
    "line, complaint",
    [
        ('{"context": "a", "choices": ["b", "c"]}', "'label'"),
        ('{"context": "a", "choices": ["b"], "label": 0}', "'choices'"),
        ('{"context": "a", "choices": ["b", "c"], "label": 2}', "'label'"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_local_task_file(llama_dir, tmp_path, line, complaint):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "x", "choices": ["y", "z"], "label": 1}\n' + line + "\n")
    with pytest.raises(ConfigError) as info:
        sparseheal.evaluate(str(llama_dir), tasks=f"local:{path}")
    assert info.value.flag == "--tasks"
    assert complaint in info.value.message and "bad.jsonl:2" in info.value.message


def test_missing_local_task(llama_dir):
    with pytest.raises(ConfigError, match="--tasks"):
        sparseheal.evaluate(str(llama_dir), tasks="local:nowhere.jsonl")


def test_summarize_results_reads_metric_keys():
    raw = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.72,
                     "acc_norm_stderr,none": 0.01},
            "wikitext": {"word_perplexity,none": 20.0},
        },
        "n-samples": {"piqa": {"original": 1838, "effective": 100}},
    }
    summary = summarize_results(raw, {"piqa": "lm-eval"})
    assert summary == {"piqa": {"acc": 0.7, "acc_stderr": 0.01, "acc_norm": 0.72, "acc_norm_stderr": 0.01,
                                "n": 100, "source": "lm-eval"}}
