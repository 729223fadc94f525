"""Training on CUDA through the product's own `train_adapter` (marker `cuda`, skipped without a device), and the CPU
twins of its checks. Imports only the core library and the fixtures, so `bash bench/gpu_check.sh` runs it on a
machine without Prefect or MLflow."""

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import desctune.training.model
from conftest import SAMPLE, tiny_config
from desctune.data.tokenize import tokenize_frame
from desctune.evaluation.generation import generate, load_adapter_model
from desctune.files import write_parquet
from desctune.models import load_tokenizer, provision
from desctune.training.launch import train_under_torchrun
from desctune.training.loop import train_adapter
from desctune.training.model import build_peft_model, compile_layers, is_compiled
from desctune.training.plan import plan

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ON_CUDA = pytest.param("cuda", marks=CUDA)


def token_files(tmp_path: Path, model_dir: Path, n_train: int, n_val: int = 4, max_chars: int | None = None) -> dict:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[: n_train + n_val]]
    df = pd.DataFrame(rows)[["uid", "title", "content"]]
    if max_chars:
        df["content"] = df["content"].str.slice(0, max_chars).str.rsplit(" ", n=1).str[0]
    tokenizer, cfg = load_tokenizer(model_dir), tiny_config(tmp_path, model_dir)
    out = {}
    for name, part in (("train", df.iloc[:n_train]), ("val", df.iloc[n_train:])):
        table, _ = tokenize_frame(part, tokenizer, cfg.model)
        path = tmp_path / f"tokens_{name}.parquet"
        out[name] = {"path": str(path), "sha256": write_parquet(table, path)}
    return out


class Interrupt(Exception):
    pass


def stop_at_first_checkpoint(step, path):
    raise Interrupt(step)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, tiny_model_dir, device):
    """Dropout masks (numpy on the CPU, the card's generator on CUDA), batches by token budget, optimizer and
    scheduler all continue exactly where the checkpoint left them."""
    cfg = tiny_config(tmp_path, tiny_model_dir, model={"device": device}, lora={"dropout": 0.1},
                      train={"max_steps": 8, "save_steps": 4, "max_tokens_per_batch": 1024, "compile": False})
    tokens, base = token_files(tmp_path, tiny_model_dir, 40), provision(str(tiny_model_dir), tmp_path)
    whole = train_adapter(tokens, base, cfg, tmp_path / "whole")
    with pytest.raises(Interrupt):
        train_adapter(tokens, base, cfg, tmp_path / "resumed", on_checkpoint=stop_at_first_checkpoint)
    resumed = train_adapter(tokens, base, cfg, tmp_path / "resumed")
    assert resumed["resumed_from"].endswith("checkpoint-4") and whole["resumed_from"] is None
    assert whole["plan"]["max_tokens_per_batch"] == 1024 and whole["plan"]["lora_masks"] == (
        "numpy" if device == "cpu" else "device")
    want, got = (load_file(Path(r["adapter_path"]) / "adapter_model.safetensors") for r in (whole, resumed))
    assert want.keys() == got.keys()
    for name in want:
        if device == "cpu":
            assert torch.equal(got[name], want[name]), name
        else:
            assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name
    assert [h["loss"] for h in resumed["history"]][-1] == pytest.approx(whole["history"][-1]["loss"], rel=1e-5)


def test_compiled_layers_keep_their_names_and_a_failed_compile_trains_eagerly(tmp_path, tiny_model_dir, monkeypatch,
                                                                            caplog):
    def broken_backend(graph, inputs):
        raise RuntimeError("no compiler here")

    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 3, "compile": True})
    p = plan(cfg, "cpu", torch.float32)
    assert p.compile and not p.fast_lora
    model = build_peft_model(str(tiny_model_dir), cfg, p)
    names = list(model.state_dict())
    assert is_compiled(model) and compile_layers(model) == 2 and list(model.state_dict()) == names

    monkeypatch.setattr(desctune.training.model, "COMPILE_BACKEND", broken_backend)
    tokens = token_files(tmp_path, tiny_model_dir, 16)
    with caplog.at_level(logging.WARNING, logger="desctune.training.loop"):
        result = train_adapter(tokens, provision(str(tiny_model_dir), tmp_path), cfg, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "desctune.training.loop"]
    assert len(warnings) == 1 and warnings[0].startswith("compiling the decoder layers failed")
    assert result["steps"] == 3 and result["plan"]["compile"]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory, tiny_model_dir):
    """A tiny model overfits four records on CUDA with the automatic plan (token budget), its layers compiled as a
    run of 10M tokens or more would have them (this one is far too short for compiling to pay on its own)."""
    tmp = tmp_path_factory.mktemp("cuda-run")
    cfg = tiny_config(tmp, tiny_model_dir, model={"device": "cuda", "max_seq_len": 160}, lora={"r": 16, "alpha": 32},
                      train={"max_steps": 60, "learning_rate": 1e-2, "warmup_ratio": 0.0, "logging_steps": 5,
                             "save_steps": 1000, "compile": True})
    tokens = token_files(tmp, tiny_model_dir, 4, 2, max_chars=120)
    return cfg, tmp, train_adapter(tokens, provision(str(tiny_model_dir), tmp), cfg, tmp / "out")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tiny_model_learns_on_cuda_with_the_automatic_plan(cuda_run):
    _, _, result = cuda_run
    p = result["plan"]
    assert result["device"] == "cuda" and p["base_dtype"] in ("bfloat16", "float16")
    assert p["compile"] and not p["gradient_checkpointing"] and p["max_tokens_per_batch"] == 16384
    assert p["reason"].startswith("cuda: ") and result["peak_memory_mb"] > 0
    assert result["steps"] == 60 and result["train_loss_last"] < result["train_loss_first"] - 0.8, result["history"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_generation_on_cuda_equals_one_at_a_time(cuda_run, tiny_model_dir):
    cfg, tmp, result = cuda_run
    model_cfg = cfg.model.model_copy(update={"dtype": "fp32"})
    model, tokenizer, _ = load_adapter_model(result["adapter_path"], tmp, model_cfg)
    assert next(model.parameters()).device.type == "cuda"
    titles = [json.loads(line)["title"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:4]]
    batched = generate(model, tokenizer, titles, cfg.model.system_prompt, batch_size=4, max_new_tokens=24)
    single = [generate(model, tokenizer, [t], cfg.model.system_prompt, batch_size=1, max_new_tokens=24)[0]
              for t in titles]
    assert batched == single


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_nf4_and_bf16_plans_load_and_train_on_cuda(tmp_path, tiny_model_dir, quantization):
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tmp_path, tiny_model_dir, model={"device": "cuda", "quantization": quantization},
                      train={"max_steps": 6, "save_steps": 1000})
    result = train_adapter(token_files(tmp_path, tiny_model_dir, 24), provision(str(tiny_model_dir), tmp_path), cfg,
                           tmp_path / "out")
    p = result["plan"]
    assert p["load_in_4bit"] == (quantization == "nf4") and p["kbit_prepare"] == (quantization == "nf4")
    assert p["base_dtype"] == ("nf4" if quantization == "nf4" else p["dtype"])
    assert result["steps"] == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result["history"])
    assert (Path(result["adapter_path"]) / "adapter_model.safetensors").is_file()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_under_torchrun_trains_what_the_task_process_trains(tmp_path, tiny_model_dir):
    """The torchrun path on one card (train.launcher=torchrun): NCCL process group, the rank's own GPU, the result
    and adapter written by rank 0; fp32, eager, so both runs take the same kernels."""
    cfg = tiny_config(tmp_path, tiny_model_dir, model={"device": "cuda", "dtype": "fp32"},
                      train={"max_steps": 6, "save_steps": 3, "compile": False})
    tokens, base = token_files(tmp_path, tiny_model_dir, 24), provision(str(tiny_model_dir), tmp_path)
    here = train_adapter(tokens, base, cfg, tmp_path / "here")
    under = train_under_torchrun(tokens, base, cfg.model_copy(update={"train": cfg.train.updated(launcher="torchrun")}),
                                 tmp_path / "torchrun")
    assert under["device"] == "cuda" and under["steps"] == 6 and (tmp_path / "torchrun" / "checkpoints").is_dir()
    want, got = (load_file(Path(r["adapter_path"]) / "adapter_model.safetensors") for r in (here, under))
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5, atol=1e-7), name
