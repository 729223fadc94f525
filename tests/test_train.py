"""Train: the loss sees only the answer, batches waste little padding, learning happens end to end, the GPU plan."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
from rouge_score import rouge_scorer

from conftest import SAMPLE, tiny_config
from desctune.config import Config, load_config
from desctune.data.tokenize import IGNORE, encode_example, tokenize_frame
from desctune.evaluation.generation import base_context, generate, load_adapter_model
from desctune.files import file_sha256, write_parquet
from desctune.models import load_tokenizer, provision
from desctune.tracking import mlflow_sink
from desctune.training.batching import collate, length_grouped_batches, micro_batches, token_budget_batches, total_steps
from desctune.training.loop import train_adapter
from desctune.training.memory import ModelShape, estimate_memory, memory_plan
from desctune.training.model import supervised_loss
from desctune.training.plan import COMPILE_MIN_TOKENS, plan, planned_tokens

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


TINYLLAMA = ModelShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
LLAMA_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
GB = 10**9


def test_model_shapes_count_the_known_parameters():
    assert TINYLLAMA.body_linear_params + TINYLLAMA.other_params == 1_100_048_384  # TinyLlama-1.1B-Chat-v1.0
    assert LLAMA_7B.body_linear_params + LLAMA_7B.other_params == 6_738_415_616  # Llama-2-7b
    gpu = load_config(ROOT / "configs" / "gpu-tinyllama.yaml")
    per_rank = 2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 5632)  # (in + out): q, o; k, v; the MLP
    assert TINYLLAMA.lora_params(32, gpu.lora.target_modules) == 22 * 32 * per_rank


def test_memory_estimate_orders_the_options_and_scales_with_the_budget():
    targets = load_config(None).lora.target_modules
    est = {(base, ckpt): estimate_memory(TINYLLAMA, base, 32, targets, 16384, ckpt, 4096)
           for base in ("bfloat16", "nf4") for ckpt in (False, True)}
    assert est["nf4", True] < est["bfloat16", True] < est["nf4", False] < est["bfloat16", False]
    assert 40 * GB < est["bfloat16", False] < 60 * GB  # around an eager step's measured peak at 16k tokens
    assert estimate_memory(TINYLLAMA, "bfloat16", 32, targets, 8192, False, 4096) < est["bfloat16", False] * 0.6
    assert 2.2 * GB < estimate_memory(TINYLLAMA, "bfloat16", 32, targets, 0, False, 0) < 2.7 * GB


@pytest.mark.parametrize("shape, free_gb, dtype, want", [
    (TINYLLAMA, 23, "bfloat16", ("bfloat16", True, 16384)),  # a 24 GB card: bf16 with checkpointing
    (TINYLLAMA, 79, "bfloat16", ("bfloat16", False, 16384)),  # an 80 GB card: bf16, no checkpointing
    (TINYLLAMA, 14.7, "float16", ("float16", True, 16384)),  # a T4 still holds the 1.1B in fp16
    (LLAMA_7B, 14.7, "float16", ("nf4", True, 4096)),  # a 7B on a 16 GB T4: NF4, and a smaller batch
    (LLAMA_7B, 79, "bfloat16", ("bfloat16", True, 16384)),
])
def test_cuda_memory_plan_picks_bf16_when_it_fits_else_nf4(shape, free_gb, dtype, want):
    m = memory_plan(shape, int(free_gb * GB), dtype, 32, load_config(None).lora.target_modules, min_tokens=512)
    assert (m.base_dtype, m.gradient_checkpointing, m.max_tokens_per_batch) == want
    assert m.estimate_bytes <= m.usable_bytes < free_gb * GB
    assert f"of {free_gb * GB / 2**30:.1f} GiB free" in m.reason and "may not fit" not in m.reason


def gpu_plan(free_gb=79, shape=TINYLLAMA, dtype=torch.bfloat16, **sections):
    cfg = load_config(ROOT / "configs" / "gpu-tinyllama.yaml",
                      [f"{k}={v}" for k, v in sections.items()])
    return plan(cfg, "cuda", dtype, shape, int(free_gb * GB))


def test_gpu_profile_plans_the_card_and_explicit_settings_win():
    p = gpu_plan()
    assert (p.base_dtype, p.load_in_4bit, p.gradient_checkpointing, p.compile, p.fast_lora) == (
        "bfloat16", False, False, True, False)
    assert (p.max_tokens_per_batch, p.head_chunk_rows, p.fused_adamw, p.grad_scaler) == (16384, 4096, True, False)
    assert p.reason.startswith("cuda: bfloat16 base, no gradient checkpointing, 16384-token batches: needs ~")
    assert p.reason.endswith("compiled decoder layers") and p.free_memory_gib == 73.6
    assert gpu_plan(23).gradient_checkpointing and "would need" in gpu_plan(23).reason
    qlora = gpu_plan(**{"model.quantization": "nf4"})
    assert (qlora.base_dtype, qlora.load_in_4bit, qlora.kbit_prepare, qlora.gradient_checkpointing) == (
        "nf4", True, True, False)
    alias = plan(Config.model_validate({"model": {"load_in_4bit": True}}), "cuda", torch.bfloat16, TINYLLAMA, 79 * GB)
    assert alias.load_in_4bit
    smaller = gpu_plan(23, **{"train.gradient_checkpointing": "false", "model.quantization": "none"})
    assert (smaller.base_dtype, smaller.gradient_checkpointing, smaller.max_tokens_per_batch) == (
        "bfloat16", False, 4096)
    forced = gpu_plan(23, **{"train.gradient_checkpointing": "false", "train.max_tokens_per_batch": 16384})
    assert (forced.base_dtype, forced.gradient_checkpointing) == ("nf4", False) and "may not fit" in forced.reason
    eager = gpu_plan(**{"train.compile": "false", "train.max_tokens_per_batch": 4096})
    assert (eager.compile, eager.fast_lora, eager.lora_masks, eager.max_tokens_per_batch) == (
        False, True, "device", 4096)
    by_count = gpu_plan(**{"train.max_tokens_per_batch": "null"})
    assert by_count.max_tokens_per_batch is None and "batches of 16:" in by_count.reason
    assert gpu_plan(dtype=torch.float16).grad_scaler
    assert gpu_plan(14.7, LLAMA_7B, torch.float16).load_in_4bit
    with pytest.raises(ValueError, match="shape"):
        plan(load_config(None), "cuda", torch.bfloat16)


def test_cuda_plan_compiles_only_a_run_long_enough_for_the_warm_up_to_pay():
    reference = load_config(ROOT / "configs" / "gpu-tinyllama.yaml")
    lengths = [207] * 12_000  # the reference run's training split at the sample's mean length
    assert planned_tokens(lengths, reference.train) == 4_968_000  # 2 epochs
    assert planned_tokens(lengths, reference.train, world_size=2) == 2_484_000
    short = plan(reference, "cuda", torch.bfloat16, TINYLLAMA, 79 * GB, train_tokens=4_968_000)
    assert (short.compile, short.fast_lora, short.lora_masks) == (False, True, "device")
    assert short.reason.endswith("eager, fused LoRA (device dropout masks) (~5.0M tokens to train: compiling pays "
                                 "from ~10M)")
    qlora = load_config(ROOT / "configs" / "gpu-tinyllama.yaml", ["model.quantization=nf4"])
    short_nf4 = plan(qlora, "cuda", torch.bfloat16, TINYLLAMA, 79 * GB, train_tokens=4_968_000)
    assert (short_nf4.load_in_4bit, short_nf4.compile, short_nf4.fast_lora) == (True, False, False)
    assert "eager, PEFT LoRA (~5.0M tokens" in short_nf4.reason
    long = plan(reference, "cuda", torch.bfloat16, TINYLLAMA, 79 * GB, train_tokens=COMPILE_MIN_TOKENS)
    assert long.compile and long.reason.endswith("compiled decoder layers")
    forced = load_config(ROOT / "configs" / "gpu-tinyllama.yaml", ["train.compile=true"])
    assert plan(forced, "cuda", torch.bfloat16, TINYLLAMA, 79 * GB, train_tokens=1000).compile  # explicit wins
    steps = load_config(None, ["train.max_steps=60", "train.max_tokens_per_batch=1024", "train.grad_accum=2"]).train
    assert planned_tokens(lengths, steps) == 60 * 2 * 1024
    by_count = load_config(None, ["train.max_steps=10", "train.max_tokens_per_batch=null", "train.batch_size=4"])
    assert planned_tokens([100, 300], by_count.train) == 10 * 4 * 300


def test_cpu_plan_is_what_it_was_and_never_quantizes():
    before = dict(device="cpu", dtype="bfloat16", base_dtype="bfloat16", autocast=True, load_in_4bit=False,
                  kbit_prepare=False, gradient_checkpointing=False, grad_scaler=False, fused_adamw=False,
                  attn_implementation="sdpa", num_workers=0, fast_lora=True)
    for profile in ("cpu.yaml", "gpu-tinyllama.yaml"):
        p = asdict(plan(load_config(ROOT / "configs" / profile), "cpu", torch.bfloat16))
        assert {k: p[k] for k in before} == before
        assert (p["compile"], p["lora_masks"], p["max_tokens_per_batch"], p["head_chunk_rows"]) == (
            False, "numpy", None, 128)
    assert plan(load_config(ROOT / "configs" / "cpu.yaml"), "cpu", torch.float32).autocast is False
    nf4 = load_config(None, ["model.quantization=nf4", "train.max_tokens_per_batch=2048"])
    assert (plan(nf4, "cpu", torch.float32).load_in_4bit, plan(nf4, "cpu", torch.float32).max_tokens_per_batch) == (
        False, 2048)


def test_token_budget_batches_cover_every_example_once_within_the_budget():
    torch.manual_seed(0)
    lengths = [int(x) for x in torch.randint(20, 512, (3000,))] + [5000]
    batches = token_budget_batches(lengths, 4096, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 4096 or len(b) == 1 for b in batches)
    assert [5000] in [[lengths[i] for i in b] for b in batches]
    sizes = sorted(len(b) for b in batches)
    assert sizes[0] <= 8 and sizes[-1] >= 50  # long examples in short batches, short ones in wide batches
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.05 and sum(lengths) / len(batches) > 3000
    assert batches == token_budget_batches(lengths, 4096, seed=1) != token_budget_batches(lengths, 4096, seed=2)
    cfg = tiny_config(Path("/tmp"), Path("/tmp"), train={"grad_accum": 2})
    schedule = micro_batches(lengths, cfg.train, 30, max_tokens=4096)
    assert schedule[:60] == token_budget_batches(lengths, 4096, seed=cfg.train.seed)[:60]


def overfit(tmp_path, base, artifacts_dir, tokenizer, df, model=(), base_too=True, **train):
    """Train on `df` alone, then greedy-generate for its titles: ROUGE-L of each output against its description,
    with the adapter and, with `base_too`, without it (else None)."""
    cfg = tiny_config(tmp_path, Path(base["path"]), model={"max_seq_len": 160, **dict(model)},
                      lora={"r": 16, "alpha": 32}, train={"logging_steps": 5, "save_steps": 1000, **train})
    tokens = token_files(tmp_path, tokenizer, cfg, df, df.head(2))
    result = train_adapter(tokens, base, cfg, tmp_path / "out")
    model, tok, _ = load_adapter_model(result["adapter_path"], artifacts_dir)
    titles, refs = list(df["title"]), list(df["content"])
    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def rouge(outs):
        return [scorer.score(r, o)["rougeL"].fmeasure for r, o in zip(refs, outs)]

    tuned = rouge(generate(model, tok, titles, cfg.model.system_prompt, max_new_tokens=80))
    if not base_too:
        return result, tuned, None
    with base_context(model):
        return result, tuned, rouge(generate(model, tok, titles, cfg.model.system_prompt, max_new_tokens=80))


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
    result, rouge, _ = overfit(tmp_path, embedded_base, ROOT / "artifacts", tokenizer, df, base_too=False,
                               max_steps=25, batch_size=4, learning_rate=2e-3)
    assert min(rouge) > 0.8, rouge


def test_streams_loss_lr_and_speed_to_mlflow_and_the_progress_line_names_the_same_loss(tmp_path, tiny_model_dir,
                                                                                      tiny_tokenizer):
    """`train/loss` at a step and the progress line of that step read the same number, and the line says what it
    is: the mean of the last `train.logging_steps` steps."""
    import logging
    import re

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t", artifact_location=str(tmp_path / "mlruns"))).info.run_id
    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 6, "logging_steps": 4, "save_steps": 100})
    df = records(12)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:8], df.iloc[8:])
    log_params, log_metrics = mlflow_sink(run_id, uri)
    lines: list[str] = []
    logger = logging.getLogger("test-train-loss-lines")
    logger.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    try:
        result = train_adapter(tokens, provision(str(tiny_model_dir), tmp_path), cfg, tmp_path / "out", logger,
                               log_params=log_params, log_metrics=log_metrics, progress_seconds=0)
    finally:
        logger.removeHandler(handler)
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(loss) == [1, 4, 6]
    for name in ("train/learning_rate", "train/tokens_per_s", "train/supervised_tokens_per_s"):
        assert len(client.get_metric_history(run_id, name)) == 3
    printed = {int(m[1]): (float(m[2]), int(m[3])) for line in lines
               if (m := re.match(r"train step (\d+)/6 .*: loss ([\d.]+) \(mean of the last (\d+) steps\)", line))}
    assert sorted(printed) == [1, 2, 3, 4, 5, 6], lines  # a line every step (progress_seconds=0)
    assert {step: n for step, (_, n) in printed.items()} == {1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 6: 4}
    for step, value in loss.items():
        assert printed[step][0] == pytest.approx(value, abs=5e-5), (step, printed[step], value)
    assert [h["loss"] for h in result["history"]] == pytest.approx([loss[s] for s in (1, 4, 6)])
    data = client.get_run(run_id).data
    assert result["peak_memory_mb"] > 0 and "train/peak_memory_mb" not in data.metrics  # one number: no chart
    # the validation loss is one point at the last step, not a second one at step 0 (a flat line in the chart)
    [val] = client.get_metric_history(run_id, "train/val_loss")
    assert val.step == 6 and val.value == pytest.approx(result["val_loss"])
    assert data.params["train_plan.steps"] == "6" and data.params["train_plan.device"] == "cpu"
    assert Path(result["loss_plot"]).read_bytes()[:4] == b"\x89PNG"


SAME_TRAINING = """
import json, sys
from pathlib import Path
from desctune.config import Config
from desctune.training.loop import train_adapter

args = json.loads(sys.argv[1])
train_adapter(args["tokens"], args["base"], Config.model_validate(args["cfg"]), Path(args["out"]))
"""


def test_the_same_training_twice_writes_the_same_adapter_bytes(tmp_path, tiny_model_dir, tiny_tokenizer):
    """Two runs of one training, each in its own artifacts folder with its own copy of the base (as an embedded base
    is converted into each artifacts folder) and in a process with its own hash seed (a set's order of strings
    changes with it): every file of the two adapter folders is the same, so is the adapter's hash."""
    df = records(6)
    tokens = token_files(tmp_path, tiny_tokenizer, tiny_config(tmp_path, tiny_model_dir), df.iloc[:4], df.iloc[4:])
    base = provision(str(tiny_model_dir), tmp_path)
    files = []
    for seed in ("1", "2"):
        artifacts = tmp_path / f"run-{seed}" / "artifacts"
        cfg = tiny_config(artifacts.parent, tiny_model_dir, train={"max_steps": 2})
        copy = shutil.copytree(tiny_model_dir, artifacts / "models" / "tiny")
        args = {"tokens": tokens, "base": {**base, "path": str(copy)}, "cfg": json.loads(cfg.model_dump_json()),
                "out": str(artifacts / "train")}
        proc = subprocess.run([sys.executable, "-c", SAME_TRAINING, json.dumps(args)], cwd=ROOT, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed},
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        adapter = artifacts / "train" / "adapter"
        files.append({str(p.relative_to(adapter)): file_sha256(p) for p in adapter.rglob("*") if p.is_file()})
    assert "adapter_config.json" in files[0] and "desctune.json" in files[0]
    assert files[0] == files[1], [name for name in files[0] if files[0][name] != files[1].get(name)]
