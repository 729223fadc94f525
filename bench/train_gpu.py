"""GPU training speed: desctune's plan and loss on a random model with TinyLlama-1.1B's exact shapes, QLoRA and bf16.

No download: the model is a randomly initialised LlamaForCausalLM with TinyLlama-1.1B-Chat's configuration, saved
to a temporary folder and loaded through desctune's own `build_peft_model` (so the 4-bit NF4 + k-bit preparation +
gradient checkpointing path of `configs/gpu-tinyllama.yaml` is what runs). Batches have the shipped sample's
lengths (characters / 3.7 per token plus the chat prompt, capped at max_seq_len) with random token ids and the
prompt masked, so the supervised share matches real data. Each arm runs warm-up steps, then timed optimizer steps;
MFU compares the linear-layer FLOPs the step needs (as bench/train.py counts them) with a bf16 matmul peak measured
in the same run on the same device.

    python -m bench.train_gpu                       # on a CUDA machine: arms 4bit and bf16
    python -m bench.train_gpu --shapes tiny --device cpu --steps 2   # smoke run of the same code on a CPU
"""

from __future__ import annotations

import argparse
import json
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


def sample_lengths(max_len: int) -> list[tuple[int, int]]:
    """(total tokens, prompt tokens) per shipped sample record."""
    out = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        answer = max(8, round(len(rec.get("content", "")) / 3.7))
        out.append((min(max_len, PROMPT_TOKENS + answer), PROMPT_TOKENS))
    return out


def linear_params(shape: dict) -> tuple[int, int]:
    """(frozen body linear params, head params) of a Llama with these shapes."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i), shape["vocab_size"] * h


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_arm(model_dir: Path, shape: dict, device: str, four_bit: bool, args) -> dict:
    from desctune.config import Config
    from desctune.tokenize import IGNORE
    from desctune.train import build_peft_model, collate, plan, supervised_loss

    cfg = Config.model_validate({
        "model": {"name": str(model_dir), "max_seq_len": args.max_len, "device": device, "dtype": "bf16",
                  "load_in_4bit": four_bit, "attn_implementation": "sdpa"},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.05},
        "train": {"batch_size": args.batch, "gradient_checkpointing": device == "cuda"},
    })
    p = plan(cfg, device, torch.bfloat16)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build_peft_model(str(model_dir), cfg, p)
    model.train()
    lora = sum(q.numel() for q in model.parameters() if q.requires_grad)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-4, fused=p.fused_adamw)
    lengths = sample_lengths(args.max_len)
    gen = torch.Generator().manual_seed(0)
    real = supervised = 0
    seconds = 0.0
    for step in range(args.warmup + args.steps):
        picks = torch.randint(0, len(lengths), (args.batch,), generator=gen).tolist()
        examples = []
        for total, prompt in (lengths[i] for i in picks):
            ids = torch.randint(0, shape["vocab_size"], (total,), generator=gen).tolist()
            examples.append((ids, [IGNORE] * prompt + ids[prompt:]))
        ids, labels, n_real = collate(sorted(examples, key=lambda e: -len(e[0])), pad_id=0)
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=p.autocast):
            loss, n_sup = supervised_loss(model, ids.to(device), labels.to(device))
        (loss / n_sup).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            seconds += time.perf_counter() - t0
            real, supervised = real + n_real, supervised + n_sup
    body, head = linear_params(shape)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"arm": "4bit" if four_bit else "bf16", "seconds": seconds, "real": real, "supervised": supervised,
            "flops": needed_flops([body, head, lora], real, supervised), "peak_memory_mb": peak_mb,
            "plan": {k: getattr(p, k) for k in ("base_dtype", "gradient_checkpointing", "attn_implementation")}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu (with --shapes tiny) for a smoke run")
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SHAPES[args.shapes]
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    n = 8192 if args.device == "cuda" else 1024
    peak = bf16_matmul_gflops([(n, n, n)], seconds=2.0, device=args.device)[(n, n, n)]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(tmp)
        arms = (True, False) if args.device == "cuda" else (False,)
        for four_bit in arms:
            r = run_arm(Path(tmp), shape, args.device, four_bit, args)
            r |= {"tokens_per_s": r["real"] / r["seconds"], "supervised_tokens_per_s": r["supervised"] / r["seconds"],
                  "mfu": r["flops"] / r["seconds"] / 1e9 / peak}
            results.append(r)
            print(f"{r['arm']:5s} {args.steps} steps of {args.batch}: {r['tokens_per_s']:.0f} tokens/s "
                  f"({r['supervised_tokens_per_s']:.0f} supervised), MFU {r['mfu']:.1%}, peak memory "
                  f"{r['peak_memory_mb']:.0f} MB, plan {r['plan']}")
    print(f"bf16 matmul peak {peak:.0f} GFLOP/s on {card}; shapes {args.shapes}")
    print(" ".join(f"{r['arm']}_tokens_per_s={r['tokens_per_s']:.0f} {r['arm']}_mfu={r['mfu']:.3f}" for r in results)
          + f" peak_gflops={peak:.0f} device={card.replace(' ', '_')}")
    return results


if __name__ == "__main__":
    main()
