"""Training speed: desctune's loop vs a naive transformers Trainer, on the embedded SmolLM2 with real-length examples.

Both arms train the same LoRA (r=32, all linear layers) on the same examples (the shipped sample, cleaned and
tokenized by the real stage code, max_seq_len 256), batch 8, one pass, each in its own process (so peak RSS is its
own). The baseline is what a first attempt looks like: Trainer, fp32, every batch padded to max_seq_len, no length
grouping, full-vocabulary logits. Both are timed per optimizer step, model loading excluded. Utilisation compares
the linear-layer FLOPs the work needs (forward + input-gradient through the frozen base for real tokens, the head
only where a token is supervised, forward + both gradients for LoRA) with a bf16 matmul peak measured in this run
(the best of this model's shapes and a 2048^3 square; on CPUs with AMX the square one is several times the rest).

    python -m bench.train [--examples 48]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
BATCH, MAX_LEN = 8, 256


def tokenized(tmp: Path, n: int) -> tuple[dict, dict, "object"]:
    """(tokens dict as the tokenize stage returns it, base dict, config) for the first n cleaned sample records."""
    import pandas as pd

    from desctune.config import Config
    from desctune.data.clean import clean_text
    from desctune.data.tokenize import tokenize_frame
    from desctune.files import write_parquet
    from desctune.models import load_tokenizer, provision

    base = provision("smollm2-135m-instruct", ROOT / "artifacts")
    df = pd.read_json(SAMPLE, lines=True)[["uid", "title", "content"]]
    df["title"], df["content"] = df["title"].map(clean_text), df["content"].map(clean_text)
    df = df[df["content"].str.len() >= 100].head(n + 8)
    cfg = Config.model_validate({
        "artifacts_dir": str(tmp), "model": {"max_seq_len": MAX_LEN},
        "train": {"epochs": 1, "batch_size": BATCH, "save_steps": 10_000, "logging_steps": 1, "warmup_ratio": 0.0},
    })
    table, _ = tokenize_frame(df, load_tokenizer(base["path"]), cfg.model)
    tokens = {}
    for name, part in (("train", table.slice(0, n)), ("val", table.slice(n, 8))):
        path = tmp / f"tokens_{name}.parquet"
        tokens[name] = {"path": str(path), "sha256": write_parquet(part, path)}
    return tokens, base, cfg


def linear_params(model) -> tuple[int, int, int]:
    """(frozen base linear params without the head, head params, LoRA params)."""
    body = head = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            n = module.weight.numel()
            if "lora_" in name:
                lora += n
            elif name.endswith("lm_head"):
                head += n
            else:
                body += n
    return body, head, lora


def needed_flops(params: list[int], real_tokens: float, supervised_tokens: float) -> float:
    body, head, lora = params
    return 4 * body * real_tokens + 4 * head * supervised_tokens + 6 * lora * real_tokens


def run_desctune(tmp: Path, n: int) -> dict:
    from desctune.training.loop import train_adapter

    tokens, base, cfg = tokenized(tmp, n)
    result = train_adapter(tokens, base, cfg, tmp / "desctune")
    return {"seconds": result["seconds"], "supervised": result["supervised_tokens_per_s"] * result["seconds"],
            "real": result["tokens_per_s"] * result["seconds"], "steps": result["steps"], "dtype": result["dtype"]}


def run_baseline(tmp: Path, n: int) -> dict:
    import pandas as pd
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from desctune.data.tokenize import IGNORE
    from desctune.training.model import build_peft_model
    from desctune.training.plan import plan

    tokens, base, cfg = tokenized(tmp, n)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "fp32"})})
    model = build_peft_model(base["path"], cfg, plan(cfg, "cpu", torch.float32))
    df = pd.read_parquet(tokens["train"]["path"])
    rows = [{"input_ids": list(a), "labels": list(b)} for a, b in zip(df["input_ids"], df["labels"])]
    pad = model.config.pad_token_id

    def pad_to_max(batch):
        ids = torch.full((len(batch), MAX_LEN), pad)
        labels = torch.full((len(batch), MAX_LEN), IGNORE)
        mask = torch.zeros((len(batch), MAX_LEN), dtype=torch.long)
        for i, ex in enumerate(batch):
            k = len(ex["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class StepTimer(TrainerCallback):
        seconds, t0 = 0.0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.t0

    timer = StepTimer()
    args = TrainingArguments(
        output_dir=str(tmp / "baseline"), per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=3e-4,
        save_strategy="no", logging_steps=1000, report_to="none", use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0, seed=42,
    )
    Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_to_max, callbacks=[timer]).train()
    real = int(sum(len(r["input_ids"]) for r in rows))
    sup = int(sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows))
    return {"seconds": timer.seconds, "supervised": sup, "real": real, "steps": -(-len(rows) // BATCH),
            "params": linear_params(model), "dtype": "float32"}


MODEL_SHAPES = ((2048, 576, 1536), (2048, 1536, 576), (1024, 576, 49152))  # MLP in/out, vocabulary head
SQUARE = (2048, 2048, 2048)


def bf16_matmul_gflops(shapes=(*MODEL_SHAPES, SQUARE), seconds: float = 4.0, device: str = "cpu",
                       dtype: torch.dtype = torch.bfloat16) -> dict[tuple[int, int, int], float]:
    """bf16 (or `dtype`) matmul rate of each (m, k, n) shape on `device` (on the CPU, all threads torch uses)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rates = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        sync()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(shapes):
            a @ b
            reps += 1
        sync()
        rates[(m, k, n)] = 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
    return rates


def child(arm: str, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{arm}-") as tmp:
        out = (run_desctune if arm == "desctune" else run_baseline)(Path(tmp), n)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def measure(arm: str, n: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.train", "--arm", arm, "--examples", str(n)], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{arm} arm failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--arm", choices=["desctune", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return child(args.arm, args.examples)
    rates = bf16_matmul_gflops()
    peak, model_peak = max(rates.values()), max(rates[shape] for shape in MODEL_SHAPES)
    runs = {arm: measure(arm, args.examples) for arm in ("baseline", "desctune")}
    rate = {arm: r["supervised"] / r["seconds"] for arm, r in runs.items()}
    params = runs["baseline"]["params"]
    achieved = {arm: needed_flops(params, r["real"], r["supervised"]) / r["seconds"] / 1e9 for arm, r in runs.items()}
    util = {arm: gflops / peak for arm, gflops in achieved.items()}
    for arm, r in runs.items():
        print(f"{arm:9s} {r['steps']} steps of {BATCH} in {r['seconds']:.1f} s ({r['dtype']}): "
              f"{rate[arm]:.0f} supervised tokens/s, {r['real'] / r['seconds']:.0f} real tokens/s, "
              f"{util[arm]:.0%} of the bf16 peak, peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"bf16 matmul GFLOP/s on {torch.get_num_threads()} threads: "
          + ", ".join(f"{m}x{k}x{n} {g:.0f}" for (m, k, n), g in rates.items())
          + f"; desctune's linear layers ran at {achieved['desctune']:.0f} GFLOP/s, {achieved['desctune'] / model_peak:.0%}"
          f" of the best model-shape rate")
    print(f"ratio={rate['desctune'] / rate['baseline']:.2f} desctune_supervised_tokens_per_s={rate['desctune']:.0f} "
          f"baseline_supervised_tokens_per_s={rate['baseline']:.0f} desctune_peak_util={util['desctune']:.2f} "
          f"baseline_peak_util={util['baseline']:.2f} bf16_peak_gflops={peak:.0f} "
          f"desctune_model_shape_util={achieved['desctune'] / model_peak:.2f} bf16_model_shape_gflops={model_peak:.0f} "
          f"desctune_peak_rss_mb={runs['desctune']['peak_rss_mb']:.0f} "
          f"baseline_peak_rss_mb={runs['baseline']['peak_rss_mb']:.0f} examples={args.examples}")


if __name__ == "__main__":
    main()
