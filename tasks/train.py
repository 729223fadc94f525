"""Train: LoRA (QLoRA on CUDA) on the tokenized Parquet with transformers' Trainer.

No re-tokenizing here: batches are built from the stored input_ids/labels, grouped by length and padded only to the
longest example in the batch. Checkpoints land every `train.save_steps` steps; a re-run of the same configuration
resumes from the newest complete checkpoint (one whose trainer_state.json, written last, exists).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from desctune.cache import code_version
from desctune.config import Config, LoraConfig, ModelConfig, TrainConfig
from desctune.files import atomic_dir, atomic_path, dir_sha256, stage_dir

log = logging.getLogger(__name__)

IGNORE = -100


class TokenDataset(torch.utils.data.Dataset):
    """The tokenized Parquet as a list of {"input_ids", "labels"} examples."""

    def __init__(self, path: str | Path):
        df = pd.read_parquet(path, columns=["input_ids", "labels"])
        self.rows = [{"input_ids": list(a), "labels": list(b)} for a, b in zip(df["input_ids"], df["labels"])]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class PadCollator:
    """Right-pads a batch to its own longest example; labels are padded with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(ex["input_ids"]) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
            ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """Newest complete checkpoint; incomplete ones (killed mid-save) are removed so they are never trusted."""
    complete = []
    for d in ckpt_dir.glob("checkpoint-*"):
        if (d / "trainer_state.json").is_file():
            complete.append((int(d.name.split("-")[-1]), d))
        else:
            log.warning("removing incomplete checkpoint %s", d)
            shutil.rmtree(d, ignore_errors=True)
    return str(max(complete)[1]) if complete else None


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dataloader_workers(requested: int | None) -> int:
    """Collation is cheap: workers only pay off with cores to spare for them."""
    if requested is not None:
        return requested
    return max(0, min(4, (os.cpu_count() or 1) // 4))


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (response tokens)")
    ax.set_title("desctune training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def build_peft_model(base_path: str, cfg: Config, device: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tasks.base_model import load_model

    model = load_model(base_path, cfg.model, device)
    if cfg.model.load_in_4bit and device == "cuda":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def training_arguments(cfg: Config, out_dir: Path, device: str, dtype: torch.dtype):
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        gradient_checkpointing=t.gradient_checkpointing and not cfg.model.load_in_4bit,
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=dataloader_workers(t.num_workers),
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",
        seed=t.seed,
        optim="paged_adamw_8bit" if cfg.model.load_in_4bit and device == "cuda" else "adamw_torch",
    )


def make_logging_callback(run_id: str | None, tracking_uri: str | None, history: list[dict]):
    from transformers import TrainerCallback

    from desctune.tracking import client

    mlflow_client = client(tracking_uri) if run_id and tracking_uri else None

    class StepLogger(TrainerCallback):
        """Keeps the loss history and streams loss, learning rate and tokens/s to the MLflow run."""

        def __init__(self):
            self.t0, self.tokens0 = time.perf_counter(), 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            now = time.perf_counter()
            tokens = int(state.num_input_tokens_seen)
            rate = (tokens - self.tokens0) / max(now - self.t0, 1e-9)
            self.t0, self.tokens0 = now, tokens
            row = {"step": state.global_step, "loss": float(logs["loss"]),
                   "learning_rate": float(logs.get("learning_rate", 0.0)), "tokens_per_s": rate}
            history.append(row)
            if mlflow_client is not None:
                ts = int(time.time() * 1000)
                for key in ("loss", "learning_rate", "tokens_per_s"):
                    name = "train_loss" if key == "loss" else f"train_{key}"
                    mlflow_client.log_metric(run_id, name, row[key], timestamp=ts, step=row["step"])

    return StepLogger()


def train_adapter(
    tokens: dict, base: dict, cfg: Config, out_dir: Path, run_id: str | None = None, tracking_uri: str | None = None
) -> dict:
    """Train the LoRA adapter; writes out_dir/adapter (safetensors + tokenizer + desctune.json) and loss.png."""
    from transformers import Trainer

    from tasks.base_model import compute_dtype, load_tokenizer, resolve_device

    device = resolve_device(cfg.model)
    dtype = compute_dtype(cfg.model, device)
    tokenizer = load_tokenizer(base["path"])
    model = build_peft_model(base["path"], cfg, device)
    trainable, total = model.get_nb_trainable_parameters()
    train_ds, val_ds = TokenDataset(tokens["train"]["path"]), TokenDataset(tokens["val"]["path"])
    history: list[dict] = []
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, out_dir, device, dtype),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[make_logging_callback(run_id, tracking_uri, history)],
    )
    resume = latest_checkpoint(out_dir / "checkpoints")
    if resume:
        log.info("resuming training from %s", resume)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    val_loss = float(trainer.evaluate()["eval_loss"])
    adapter = out_dir / "adapter"
    with atomic_dir(adapter) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "base_model": {k: base[k] for k in ("name", "sha256", "source")},
            "system_prompt": cfg.model.system_prompt,
            "max_seq_len": cfg.model.max_seq_len,
            "config": json.loads(cfg.model_dump_json()),
        }
        (tmp / "desctune.json").write_text(json.dumps(meta, indent=2))
    if history:
        plot_loss(history, out_dir / "loss.png")
    steps_run = max(result.global_step - (int(resume.split("-")[-1]) if resume else 0), 1)
    return {
        "adapter_path": str(adapter),
        "adapter_sha256": dir_sha256(adapter),
        "loss_plot": str(out_dir / "loss.png") if history else None,
        "history": history,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "train_loss_mean": float(result.training_loss),
        "val_loss": val_loss,
        "steps": int(result.global_step),
        "resumed_from": resume,
        "seconds": seconds,
        "tokens_per_s": float(result.metrics.get("train_tokens_per_second", 0.0))
        or float(trainer.state.num_input_tokens_seen) / max(seconds, 1e-9),
        "seconds_per_step": seconds / steps_run,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "peak_memory_mb": peak_memory_mb(device),
        "mlflow_run_id": run_id,
    }


CODE = code_version(__name__, "tasks.base_model")


@task(name="train", cache_policy=(INPUTS - "run_id" - "tracking_uri") + TASK_SOURCE, persist_result=True, retries=1)
def train(
    tokens: dict,
    base: dict,
    model: ModelConfig,
    lora: LoraConfig,
    training: TrainConfig,
    artifacts_dir: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    code: str = CODE,
) -> dict:
    """Train (or resume) the adapter for this exact data and configuration; cached on those alone."""
    cfg = Config(artifacts_dir=artifacts_dir, model=model, lora=lora, train=training)
    keys = (tokens["train"]["sha256"], tokens["val"]["sha256"], base["sha256"], model.digest(), lora.digest(),
            training.digest(), code)
    return train_adapter(tokens, base, cfg, stage_dir(artifacts_dir, "train", *keys), run_id, tracking_uri)
