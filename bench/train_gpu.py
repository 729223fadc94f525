"""GPU training speed: the seed's CUDA setup against desctune's automatic plan (and TRL), TinyLlama-1.1B shapes.

No download: the model is a randomly initialised LlamaForCausalLM with TinyLlama-1.1B-Chat's configuration, saved
to a temporary folder and loaded through desctune's own `plan` and `build_peft_model`. Examples have the shipped
sample's lengths (characters / 3.7 per token plus the chat prompt, capped at max_seq_len) with random token ids and
the prompt masked, so the supervised share matches real data. Arms, in one process, one after the other:

- seed: what the CUDA plan was before it was automatic: 4-bit NF4, gradient checkpointing, batches of 16 random
  examples, PEFT's LoRA forward, eager;
- auto: `desctune.training.plan.plan` with every setting on auto and no token count, so layers are compiled as for a long
  run (on an H200: bf16, no checkpointing, compiled decoder layers, 16k-token length-grouped batches; `--eager`: the
  same plan eager, with the fused LoRA layers), trained with the product's loss and compile fallback;
- trl: TRL's SFTTrainer as its documentation sets it up for speed (bf16, padding_free, Liger kernels if installed,
  PEFT LoRA on all linear layers) on the same examples, pre-tokenized with their completion masks, 4 x --batch
  examples per step; skipped, with the reason printed, where trl is not installed.

Each arm runs warm-up steps (timed apart: that is where compilation happens), then timed optimizer steps; MFU
compares the linear-layer FLOPs the real tokens need (as bench/train.py counts them) with a bf16 matmul peak
measured in the same run on the same device. The last line is key=value pairs, the auto/seed ratio first.

    python -m bench.train_gpu                       # on a CUDA machine
    python -m bench.train_gpu --shapes tiny --device cpu --steps 2   # smoke run of the same code on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.train import bf16_matmul_gflops, needed_flops

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, tie_word_embeddings=False),
}
PROMPT_TOKENS = 40  # system prompt + title + chat markup, measured on the embedded tokenizer's template
SEED_BATCH = 16
log = logging.getLogger("bench.train_gpu")


def sample_lengths(max_len: int) -> list[tuple[int, int]]:
    """(total tokens, prompt tokens) per shipped sample record."""
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        answer = max(8, round(len(rec.get("content", "")) / 3.7))
        out.append((min(max_len, PROMPT_TOKENS + answer), PROMPT_TOKENS))
    return out


def synthetic_examples(lengths: list[tuple[int, int]], vocab: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) with the sample's lengths, random ids and the prompt masked, as the tokenize stage writes."""
    from desctune.data.tokenize import IGNORE

    gen = torch.Generator().manual_seed(0)
    out = []
    for total, prompt in lengths:
        ids = torch.randint(0, vocab, (total,), generator=gen).tolist()
        out.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def linear_params(shape: dict) -> tuple[int, int]:
    """(frozen body linear params, head params) of a Llama with these shapes."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i), shape["vocab_size"] * h


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def arm_config(arm: str, model_dir: Path, device: str, args):
    """The seed's explicit CUDA settings, or every setting on auto (on the CPU, `--compile` forces compilation)."""
    from desctune.config import Config

    model = {"name": str(model_dir), "max_seq_len": args.max_len, "device": device, "dtype": "bf16"}
    train: dict = {"batch_size": SEED_BATCH}
    if arm == "seed":
        model["quantization"] = "nf4"
        train |= {"gradient_checkpointing": device == "cuda", "compile": False, "max_tokens_per_batch": None}
    elif device == "cpu":
        train |= {"compile": args.compile, "max_tokens_per_batch": args.batch * args.max_len}
    elif args.eager:
        train["compile"] = False
    return Config.model_validate({"model": model, "lora": {"r": 32, "alpha": 64, "dropout": 0.05}, "train": train})


def run_arm(arm: str, model_dir: Path, shape: dict, device: str, args) -> dict:
    from desctune.training.batching import collate, epoch_batches
    from desctune.training.memory import ModelShape
    from desctune.training.model import build_peft_model, is_compiled, supervised_loss, with_eager_fallback
    from desctune.training.plan import plan

    cfg = arm_config(arm, model_dir, device, args)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from transformers import LlamaConfig

    p = plan(cfg, device, torch.bfloat16, ModelShape.from_config(LlamaConfig(**shape)))
    if arm == "seed":
        p = dataclasses.replace(p, fast_lora=False, reason=p.reason.split(", eager")[0] + ", eager, PEFT LoRA")
    torch.manual_seed(0)
    model = build_peft_model(str(model_dir), cfg, p)
    model.train()
    lora = sum(q.numel() for q in model.parameters() if q.requires_grad)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-4, fused=p.fused_adamw)
    examples = synthetic_examples(sample_lengths(args.max_len), shape["vocab_size"])
    lengths = [len(ids) for ids, _ in examples]
    if arm == "seed":
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, len(examples), (args.batch,), generator=gen).tolist()
                   for _ in range(args.warmup + args.steps)]
    else:
        batches, epoch = [], 0
        while len(batches) < args.warmup + args.steps:
            batches += epoch_batches(lengths, cfg.train, p.max_tokens_per_batch, seed=epoch)
            epoch += 1
    real = supervised = 0
    seconds = warmup_seconds = 0.0
    for step, batch in enumerate(batches[: args.warmup + args.steps]):
        ids, labels, n_real = collate(sorted((examples[i] for i in batch), key=lambda e: -len(e[0])), pad_id=0)
        ids, labels = ids.to(device), labels.to(device)

        def forward_backward() -> int:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=p.autocast):
                loss, n_sup = supervised_loss(model, ids, labels, p.head_chunk_rows)
            (loss / n_sup).backward()
            return n_sup

        sync(device)
        t0 = time.perf_counter()
        n_sup = with_eager_fallback(forward_backward, model, device, log) if step == 0 else forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step < args.warmup:
            warmup_seconds += time.perf_counter() - t0
        else:
            seconds += time.perf_counter() - t0
            real, supervised = real + n_real, supervised + n_sup
    body, head = linear_params(shape)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    keys = ("base_dtype", "gradient_checkpointing", "compile", "max_tokens_per_batch", "fast_lora", "reason")
    result = {"arm": arm, "seconds": seconds, "warmup_seconds": warmup_seconds, "real": real,
              "supervised": supervised, "flops": needed_flops([body, head, lora], real, supervised),
              "peak_memory_mb": peak_mb, "compiled": is_compiled(model),
              "plan": {k: getattr(p, k) for k in keys}}
    model = optimizer = None
    release(device)
    return result


def release(device: str) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()


def trl_arm(model_dir: Path, shape: dict, device: str, args) -> dict | str:
    """TRL's SFTTrainer as its docs configure it for speed, on the same examples; a reason string where it cannot
    (a comparison arm that breaks, on a machine with other versions of TRL's dependencies, costs its line only)."""
    if importlib.util.find_spec("trl") is None:
        return "trl is not installed"
    if device != "cuda":
        return "the TRL arm runs on CUDA only"
    try:
        return run_trl(model_dir, shape, device, args)
    except Exception as exc:  # noqa: BLE001 - reported as the arm's one line
        release(device)
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_trl(model_dir: Path, shape: dict, device: str, args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    examples = synthetic_examples(sample_lengths(args.max_len), shape["vocab_size"])
    rows = [{"input_ids": ids, "completion_mask": [int(t != -100) for t in labels]} for ids, labels in examples]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args_, state, control, **kwargs):
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    torch.cuda.reset_peak_memory_stats()
    liger = importlib.util.find_spec("liger_kernel") is not None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    config = SFTConfig(
        output_dir=str(model_dir / "trl"), bf16=True, padding_free=True, use_liger_kernel=liger,
        per_device_train_batch_size=args.batch * 4, max_length=None, completion_only_loss=True,  # capped already
        max_steps=args.warmup + args.steps, learning_rate=3e-4, logging_steps=1000, save_strategy="no",
        report_to="none", gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
    )
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[timer])
    trainer.train()
    per_step = sum(len(r["input_ids"]) for r in rows) / max(1, len(trainer.get_train_dataloader()))  # a mean
    seconds = sum(timer.times[args.warmup:])
    real = per_step * args.steps
    supervised = real * sum(sum(r["completion_mask"]) for r in rows) / sum(len(r["input_ids"]) for r in rows)
    n_lora = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
    body, head = linear_params(shape)
    result = {"arm": "trl", "seconds": seconds, "warmup_seconds": sum(timer.times[: args.warmup]), "real": real,
              "supervised": supervised, "flops": needed_flops([body, head, n_lora], real, supervised),
              "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20, "compiled": False,
              "plan": {"padding_free": True, "liger": liger}}
    del trainer, model
    release(device)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=SEED_BATCH, help="the seed arm's batch (examples)")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="on the CPU: compile the auto arm's layers too")
    parser.add_argument("--eager", action="store_true",
                        help="on CUDA: the auto arm without compiled layers (compilation's speed-up against its warm-up)")
    parser.add_argument("--arms", default="seed,auto,trl", help="which of seed,auto,trl to run (seed and auto: ratio)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu (with --shapes tiny) for a smoke run")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[args.shapes]
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    n = 8192 if args.device == "cuda" else 1024
    peak = bf16_matmul_gflops([(n, n, n)], seconds=2.0, device=args.device)[(n, n, n)]
    if args.device == "cpu":  # a CPU without native bf16 multiplies bf16 far below its fp32 rate: take the faster
        peak = max(peak, bf16_matmul_gflops([(n, n, n)], seconds=1.0, dtype=torch.float32)[(n, n, n)])
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as tmp:
        torch.manual_seed(0)
        with torch.device(args.device):  # a 1.1B random init takes seconds on a card, a while on the CPU
            LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(tmp)
        release(args.device)
        for arm in [a for a in ("seed", "auto", "trl") if a in args.arms.split(",")]:
            r = (trl_arm if arm == "trl" else lambda *a: run_arm(arm, *a))(Path(tmp), shape, args.device, args)
            if isinstance(r, str):
                print(f"{arm:5s} skipped: {r}")
                continue
            r |= {"tokens_per_s": r["real"] / r["seconds"], "supervised_tokens_per_s": r["supervised"] / r["seconds"],
                  "mfu": r["flops"] / r["seconds"] / 1e9 / peak}
            results.append(r)
            print(f"{arm:5s} {args.steps} steps: {r['tokens_per_s']:.0f} tokens/s ({r['supervised_tokens_per_s']:.0f} "
                  f"supervised), MFU {r['mfu']:.1%}, peak memory {r['peak_memory_mb']:.0f} MB, warm-up "
                  f"{r['warmup_seconds']:.1f} s ({args.warmup} steps{', compiling' if r['compiled'] else ''}), "
                  f"plan {r['plan']}")
    by_arm = {r["arm"]: r for r in results}
    if not {"seed", "auto"} <= by_arm.keys():
        return results
    ratio = by_arm["auto"]["tokens_per_s"] / by_arm["seed"]["tokens_per_s"]
    print(f"matmul peak {peak:.0f} GFLOP/s on {card} (bf16; on a CPU the faster of bf16 and fp32); shapes {args.shapes}; auto/seed {ratio:.2f}x")
    pairs = [f"ratio={ratio:.2f}"]
    for r in results:
        arm = r["arm"]
        pairs += [f"{arm}_tokens_per_s={r['tokens_per_s']:.0f}", f"{arm}_mfu={r['mfu']:.3f}",
                  f"{arm}_peak_memory_mb={r['peak_memory_mb']:.0f}", f"{arm}_warmup_s={r['warmup_seconds']:.1f}"]
    print(" ".join(pairs + [f"compiled={by_arm['auto']['compiled']}", f"peak_gflops={peak:.0f}",
                            f"device={card.replace(' ', '_')}"]))
    return results


if __name__ == "__main__":
    main()
