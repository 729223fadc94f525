"""Train: the loss sees only the answer, batches waste little padding, learning happens end to end, the GPU plan."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from rouge_score import rouge_scorer

from conftest import SAMPLE, tiny_config
from desctune.config import load_config
from desctune.files import write_parquet
from desctune.inference import base_context, generate, load_adapter_model
from desctune.models import load_tokenizer, provision
from desctune.tokenize import IGNORE, encode_example, tokenize_frame
from desctune.tracking import mlflow_sink
from desctune.train import (
    collate,
    length_grouped_batches,
    micro_batches,
    plan,
    supervised_loss,
    total_steps,
    train_adapter,
)

ROOT = Path(__file__).resolve().parents[1]


def records(n: int, max_chars: int | None = None) -> pd.DataFrame:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:n]]
    df = pd.DataFrame(rows)[["uid", "title", "content"]]
    if max_chars:
        df["content"] = df["content"].str.slice(0, max_chars).str.rsplit(" ", n=1).str[0]
    return df


def token_files(tmp_path: Path, tokenizer, cfg, train: pd.DataFrame, val: pd.DataFrame) -> dict:
    out = {}
    for name, df in (("train", train), ("val", val)):
        table, _ = tokenize_frame(df, tokenizer, cfg.model)
        path = tmp_path / f"tokens_{name}.parquet"
        out[name] = {"path": str(path), "sha256": write_parquet(table, path)}
    return out


def test_loss_is_the_cross_entropy_of_the_answer_tokens_only(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ex = [encode_example(tiny_tokenizer, t, d, "Sys.", 128) for t, d in
          (("Blue Mug 300ml", "A blue mug."), ("Acme Kettle", "Boils water fast, with a long cord."))]
    ids, labels, n_real = collate([(e["input_ids"], e["labels"]) for e in ex], tiny_tokenizer.pad_token_id)
    assert n_real == sum(len(e["input_ids"]) for e in ex)
    with torch.no_grad():
        loss_sum, n = supervised_loss(model, ids, labels)
        reference = model(input_ids=ids, labels=labels).loss
    answer_tokens = sum(sum(1 for t in e["labels"] if t != IGNORE) for e in ex)
    assert n == answer_tokens
    assert torch.allclose(loss_sum / n, reference, atol=1e-5)
    prompt_labelled = labels.clone()
    prompt_labelled[0, : ex[0]["prompt_len"]] = ids[0, : ex[0]["prompt_len"]]
    with torch.no_grad():
        assert supervised_loss(model, ids, prompt_labelled)[1] == n + ex[0]["prompt_len"] - 1


def test_length_grouped_batches_cover_every_example_once_with_little_padding():
    torch.manual_seed(0)
    lengths = [int(x) for x in torch.randint(20, 256, (1000,))]
    batches = length_grouped_batches(lengths, 8, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.05
    assert batches == length_grouped_batches(lengths, 8, seed=1)
    assert batches != length_grouped_batches(lengths, 8, seed=2)


def test_schedule_spans_epochs_and_steps_count_accumulation():
    cfg = tiny_config(Path("/tmp"), Path("/tmp"), train={"max_steps": None, "epochs": 2, "batch_size": 4,
                                                          "grad_accum": 2})
    assert total_steps(10, cfg.train) == 10
    schedule = micro_batches(list(range(40)), cfg.train, 10)
    assert len(schedule) == 20
    assert sorted(i for b in schedule[:10] for i in b) == list(range(40))


def test_gpu_profile_plans_qlora_and_cpu_never_does():
    gpu = load_config(ROOT / "configs" / "gpu-tinyllama.yaml")
    p = plan(gpu, "cuda", torch.bfloat16)
    assert (p.load_in_4bit, p.kbit_prepare, p.gradient_checkpointing) == (True, True, True)
    assert (p.base_dtype, p.dtype, p.autocast, p.attn_implementation) == ("nf4", "bfloat16", True, "sdpa")
    assert not p.grad_scaler and p.fused_adamw
    assert plan(gpu, "cuda", torch.float16).grad_scaler
    cpu = plan(gpu, "cpu", torch.bfloat16)
    assert (cpu.load_in_4bit, cpu.kbit_prepare, cpu.base_dtype, cpu.num_workers) == (False, False, "bfloat16", 0)
    assert plan(load_config(ROOT / "configs" / "cpu.yaml"), "cpu", torch.float32).autocast is False


def overfit(tmp_path, base, artifacts_dir, tokenizer, df, model=(), **train):
    """Train on `df` alone, then greedy-generate for its titles: ROUGE-L of each output against its description,
    with the adapter and without it."""
    cfg = tiny_config(tmp_path, Path(base["path"]), model={"max_seq_len": 160, **dict(model)},
                      lora={"r": 16, "alpha": 32}, train={"logging_steps": 5, "save_steps": 1000, **train})
    tokens = token_files(tmp_path, tokenizer, cfg, df, df.head(2))
    result = train_adapter(tokens, base, cfg, tmp_path / "out")
    model, tok, _ = load_adapter_model(result["adapter_path"], artifacts_dir)
    titles, refs = list(df["title"]), list(df["content"])
    tuned = generate(model, tok, titles, cfg.model.system_prompt, max_new_tokens=80)
    with base_context(model):
        untuned = generate(model, tok, titles, cfg.model.system_prompt, max_new_tokens=80)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return result, *([scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(refs, outs)] for outs in (tuned, untuned))


def test_overfits_a_handful_of_records(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The tiny random model's frozen, tied head keeps its loss high, but greedy decoding reproduces the answers."""
    df = records(4, max_chars=120)
    base = provision(str(tiny_model_dir), tmp_path)
    result, rouge, base_rouge = overfit(tmp_path, base, tmp_path, tiny_tokenizer, df, max_steps=80, batch_size=4,
                                        learning_rate=1e-2, warmup_ratio=0.0)
    assert result["steps"] == 80 and result["train_loss_last"] < result["train_loss_first"] - 0.8
    assert max(rouge) > 0.75 and sum(rouge) / len(rouge) > 0.45 and max(base_rouge) < 0.2, (rouge, base_rouge)


@pytest.mark.slow
def test_embedded_model_overfits_a_handful_of_records(tmp_path, embedded_base):
    df = records(4, max_chars=160)
    tokenizer = load_tokenizer(embedded_base["path"])
    result, rouge, _ = overfit(tmp_path, embedded_base, ROOT / "artifacts", tokenizer, df, max_steps=25,
                               batch_size=4, learning_rate=2e-3)
    assert min(rouge) > 0.8, rouge


def test_streams_loss_lr_speed_and_memory_to_mlflow(tmp_path, tiny_model_dir, tiny_tokenizer):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "mlruns"))).info.run_id
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 6, "logging_steps": 2, "save_steps": 100})
    df = records(12)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:8], df.iloc[8:])
    log_params, log_metrics = mlflow_sink(run_id, uri)
    result = train_adapter(tokens, provision(str(tiny_model_dir), tmp_path), cfg, tmp_path / "out",
                           log_params=log_params, log_metrics=log_metrics)
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 4, 6]
    for name in ("train_learning_rate", "train_tokens_per_s", "train_supervised_tokens_per_s"):
        assert len(client.get_metric_history(run_id, name)) == 4
    data = client.get_run(run_id).data
    assert data.metrics["train_peak_memory_mb"] > 0 and data.metrics["val_loss"] == pytest.approx(result["val_loss"])
    assert data.params["train_plan.steps"] == "6" and data.params["train_plan.device"] == "cpu"
    assert Path(result["loss_plot"]).read_bytes()[:4] == b"\x89PNG"
