"""bench/train_gpu.py: TinyLlama-1.1B's shapes are exact, and the benchmark's code runs end to end (on the CPU here,
with tiny shapes and compiled layers through the eager backend; the 4-bit base and the TRL arm need CUDA)."""

import math

import torch

import desctune.train
from bench.train_gpu import SHAPES, linear_params, main


def test_tinyllama_shapes_give_its_1_1b_parameters_and_the_linear_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES["tinyllama"]))
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384  # TinyLlama-1.1B-Chat-v1.0
    linear = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    body, head = linear_params(SHAPES["tinyllama"])
    assert (body + head, head) == (sum(linear), model.lm_head.weight.numel())
    shape = desctune.train.ModelShape.from_config(LlamaConfig(**SHAPES["tinyllama"]))
    assert shape.body_linear_params == body and shape.body_linear_params + shape.other_params == 1_100_048_384


def test_smoke_run_on_cpu_trains_the_seed_and_auto_arms_through_desctunes_plan(capsys, monkeypatch):
    monkeypatch.setattr(desctune.train, "COMPILE_BACKEND", "eager")
    results = main(["--shapes", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4",
                    "--max-len", "96", "--compile"])
    assert [r["arm"] for r in results] == ["seed", "auto"]
    seed, auto = results
    assert seed["plan"]["base_dtype"] == "bfloat16" and not seed["plan"]["fast_lora"] and not seed["compiled"]
    assert auto["plan"]["max_tokens_per_batch"] == 4 * 96 and auto["compiled"]
    for r in results:
        assert r["real"] > r["supervised"] > 0 and r["warmup_seconds"] > 0
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and math.isfinite(r["flops"])
    out = capsys.readouterr().out
    assert "trl   skipped: " in out or "trl   2 steps" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("ratio=") and "seed_tokens_per_s=" in last and "auto_warmup_s=" in last
