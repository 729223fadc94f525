"""Batched generation (left padding, KV cache, length-grouped batches) vs one prompt at a time, same prompts.

Runs the embedded SmolLM2-135M-Instruct with a LoRA adapter on top (random, non-zero: the fine-tuned path evaluation
takes) over real titles from the shipped sample, greedily, both ways in one process; asserts the outputs are
identical and reports the throughput ratio.

    python -m bench.generate [--prompts 16] [--max-new-tokens 48] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from desctune.config import DEFAULT_SYSTEM_PROMPT, ModelConfig
from desctune.data.clean import clean_text
from desctune.evaluation.generation import generate
from desctune.models import load_model, load_tokenizer, provision

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"


def real_titles(n: int) -> list[str]:
    """The first n distinct cleaned titles of the shipped sample."""
    titles: list[str] = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        title = clean_text(json.loads(line)["title"])
        if title and title not in titles:
            titles.append(title)
        if len(titles) == n:
            break
    return titles


def lora_model(base_path: str):
    """The base with a seeded non-zero LoRA adapter on every linear layer (r=32), in eval mode."""
    from peft import LoraConfig, get_peft_model

    model = load_model(base_path, ModelConfig(), "cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    return model.eval()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    base = provision("smollm2-135m-instruct", ROOT / "artifacts")
    tokenizer = load_tokenizer(base["path"])
    model = lora_model(base["path"])
    titles = real_titles(args.prompts)
    generate(model, tokenizer, titles[:2], DEFAULT_SYSTEM_PROMPT, 2, 4)

    def run(batch_size: int) -> list[str]:
        return generate(model, tokenizer, titles, DEFAULT_SYSTEM_PROMPT, batch_size, args.max_new_tokens)

    batched, t_batched = timed(lambda: run(args.batch_size))
    single, t_single = timed(lambda: run(1))
    mismatches = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    assert not mismatches, f"batched and one-at-a-time outputs differ on prompts {mismatches}"
    tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in batched)
    print(f"{len(titles)} real titles, greedy, max_new_tokens={args.max_new_tokens}, ~{tokens} tokens generated; "
          f"outputs identical: True")
    print(f"batched (batch {args.batch_size}): {t_batched:.1f} s; one at a time: {t_single:.1f} s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"ratio={t_single / t_batched:.2f} desctune_prompts_per_s={len(titles) / t_batched:.2f} "
        f"baseline_prompts_per_s={len(titles) / t_single:.2f} desctune_tokens_per_s={tokens / t_batched:.1f} "
        f"baseline_tokens_per_s={tokens / t_single:.1f} prompts={len(titles)} max_new_tokens={args.max_new_tokens} "
        f"batch_size={args.batch_size} peak_rss_mb={peak_mb:.0f}"
    )


if __name__ == "__main__":
    main()
