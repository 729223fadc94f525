"""Evaluate: scores, batched generation, and the adapter guard that catches the "fine-tuned == base" bug."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import SAMPLE, head_records
from desctune.config import Config, DataConfig, EvalConfig, ModelConfig
from desctune.errors import AdapterError
from desctune.evaluation.evaluate import evaluate_adapter, evaluate_file, guard_adapter, markdown_report, score
from desctune.evaluation.generation import adapter_status, base_context, generate

SYSTEM_PROMPT = "Describe the product."


def test_scores_reward_the_reference_and_count_better_worse():
    refs = ["a sturdy steel kettle that boils water fast", "soft cotton shirt in blue"]
    df, m = score(refs, {"base": ["a phone", "soft cotton shirt in blue"], "finetuned": refs})
    assert m["finetuned"]["bleu"] == pytest.approx(100.0)
    assert m["finetuned"]["rougeL"] == pytest.approx(1.0)
    assert m["base"]["rougeL"] < 1.0
    assert (m["better"], m["worse"], m["same"]) == (1, 0, 1)
    assert m["identical_outputs"] == 0.5
    assert list(df.columns[:1]) == ["reference"] and "delta_rougeL" in df


def test_the_report_lists_as_worst_only_examples_that_got_worse_cut_at_a_word():
    refs = ["a sturdy steel kettle that boils water fast"] * 3
    long = "a sturdy steel kettle " + "with a very long and winding description of its many handsome parts " * 3
    df, m = score(refs, {"base": ["a sturdy steel kettle", "a phone", "a sturdy steel kettle that boils"],
                         "finetuned": [long, "a steel kettle", "a sturdy steel kettle that boils water fast"]})
    df.insert(0, "title", ["Kettle"] * 3)
    report = markdown_report(m, df)
    worst = report.split("### Examples that got worst")[1].split("###")[0]
    rows = [line for line in worst.splitlines() if line.startswith("| Kettle")]
    assert len(rows) == 1 and (df["delta_rougeL"] < 0).sum() == 1  # the two that improved are not listed
    cell = rows[0].split(" | ")[-1].rstrip(" |")
    assert cell.endswith("…") and long.startswith(cell[:-1]) and long[len(cell) - 1] == " "  # cut between words


def peft_tiny(tiny_model_dir, init_nonzero: bool, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from desctune.models import load_model

    model = get_peft_model(load_model(tiny_model_dir, ModelConfig(name=str(tiny_model_dir))),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    if init_nonzero:
        torch.manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def save_adapter(tiny_model_dir, out: Path, init_nonzero: bool = True, seed: int = 0) -> Path:
    """A real adapter folder as training leaves it: PEFT safetensors, tokenizer and desctune.json."""
    from desctune.models import load_tokenizer, provision

    peft_tiny(tiny_model_dir, init_nonzero, seed).save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    base = provision(str(tiny_model_dir), out.parent)
    cfg = Config(model={"name": str(tiny_model_dir), "system_prompt": SYSTEM_PROMPT})
    meta = {"base_model": {k: base[k] for k in ("name", "sha256", "source")}, "system_prompt": SYSTEM_PROMPT,
            "max_seq_len": 128, "config": json.loads(cfg.model_dump_json())}
    (out / "desctune.json").write_text(json.dumps(meta))
    return out


def test_guard_rejects_zero_adapter_and_identical_outputs(tiny_model_dir):
    zero = adapter_status(peft_tiny(tiny_model_dir, init_nonzero=False))
    assert zero["loaded"] and zero["lora_parameters"] > 0 and not zero["nonzero"]
    with pytest.raises(AdapterError, match="all zero"):
        guard_adapter(zero, 0.0)
    trained = adapter_status(peft_tiny(tiny_model_dir, init_nonzero=True))
    with pytest.raises(AdapterError, match="equal the base outputs on 95%"):
        guard_adapter(trained, 0.95)
    guard_adapter(trained, 0.5)


def test_batched_generation_matches_one_at_a_time_and_adapter_toggle_changes_output(tiny_model_dir, tiny_tokenizer):
    model = peft_tiny(tiny_model_dir, init_nonzero=True)
    titles = ["Blue Mug", "Acme Stainless Steel Kettle 1.7 Litre with Auto Off", "Shirt"]
    batched = generate(model, tiny_tokenizer, titles, "Describe.", batch_size=3, max_new_tokens=10)
    single = [generate(model, tiny_tokenizer, [t], "Describe.", batch_size=1, max_new_tokens=10)[0] for t in titles]
    assert batched == single
    with base_context(model):
        base = generate(model, tiny_tokenizer, titles, "Describe.", batch_size=3, max_new_tokens=10)
    assert base != batched


def test_generation_reports_progress_within_a_batch_and_outputs_stay_the_same(tiny_model_dir, tiny_tokenizer):
    """One batch of long outputs once left the log at "titles 0/8" for minutes: progress now comes after each token,
    counting the batch by the share of its token budget spent, and the outputs are those generated without it."""
    model = peft_tiny(tiny_model_dir, init_nonzero=True)
    titles = ["Blue Mug", "Acme Stainless Steel Kettle 1.7 Litre with Auto Off", "Shirt", "Desk Lamp"]
    seen: list[float] = []
    with_progress = generate(model, tiny_tokenizer, titles, "Describe.", batch_size=4, max_new_tokens=12,
                             progress=seen.append)
    assert with_progress == generate(model, tiny_tokenizer, titles, "Describe.", batch_size=4, max_new_tokens=12)
    within = [x for x in seen if 0 < x < len(titles)]
    assert len(within) >= 5 and within == sorted(within) and seen[-1] == len(titles)


def test_evaluate_file_runs_ingest_and_clean_and_writes_the_full_report(tiny_model_dir, tmp_path):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 12)
    cfg = EvalConfig(limit=5, batch_size=4, max_new_tokens=8)
    result = evaluate_file(str(adapter), DataConfig(path=str(records)), cfg, str(tmp_path), tmp_path / "out")
    df = pd.read_parquet(result["eval_path"])
    expected = {"uid", "title", "reference", "base_output", "finetuned_output", "base_bleu", "finetuned_bleu",
                "base_rougeL", "finetuned_rougeL", "delta_bleu", "delta_rougeL"}
    assert expected <= set(df.columns) and len(df) == 5 == result["metrics"]["n"]
    clean = pd.read_parquet(result["data"]["path"])
    assert df["reference"].tolist() == clean["content"].head(5).tolist()
    assert not df["reference"].str.contains("&#|&amp;", regex=True).any()
    assert (df["delta_rougeL"] == df["finetuned_rougeL"] - df["base_rougeL"]).all()
    m = result["metrics"]
    assert m["better"] + m["worse"] + m["same"] == 5
    report = Path(result["report_path"]).read_text()
    assert "Examples that got worst" in report and f"better on {m['better']}, worse on {m['worse']}" in report
    assert Path(result["plot_path"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(result["metrics_path"]).read_text())["finetuned"] == m["finetuned"]
    assert result["adapter_status"]["active"] and result["adapter_status"]["nonzero"]


def test_saved_zero_adapter_is_refused_before_generating(tiny_model_dir, tmp_path):
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", init_nonzero=False)
    test = tmp_path / "test.parquet"
    pd.DataFrame({"title": ["Blue Mug"], "content": ["A blue mug."]}).to_parquet(test)
    with pytest.raises(AdapterError, match="LoRA weights are all zero"):
        evaluate_adapter(str(adapter), str(test), EvalConfig(), str(tmp_path), tmp_path / "out", refuse_inert=True)
    assert not (tmp_path / "out" / "eval.parquet").exists()


def test_guard_rejects_a_disabled_adapter(tiny_model_dir):
    model = peft_tiny(tiny_model_dir, init_nonzero=True)
    with base_context(model):
        status = adapter_status(model)
    assert status["loaded"] and not status["active"]
    with pytest.raises(AdapterError, match="not applied"):
        guard_adapter(status, 0.0)


def test_a_title_longer_than_the_context_is_cut_with_one_warning(tiny_model_dir, caplog):
    from desctune.models import load_tokenizer

    model, tokenizer = peft_tiny(tiny_model_dir, True), load_tokenizer(tiny_model_dir)
    titles = ["Blue ceramic mug " * 2000, "Steel kettle"]
    with caplog.at_level("WARNING", logger="desctune.evaluation.generation"):
        out = generate(model, tokenizer, titles, "Describe.", batch_size=2, max_new_tokens=8)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()] == [
        "1 title(s) cut short so that prompt and max_new_tokens fit the model's context "
        "(prompts of at most 504 tokens)"]
