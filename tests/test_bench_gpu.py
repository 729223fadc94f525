"""bench/train_gpu.py: TinyLlama-1.1B's shapes are exact, and the benchmark's code runs end to end (on the CPU here,
with tiny shapes; the 4-bit arm needs CUDA)."""

import math

import torch

from bench.train_gpu import SHAPES, linear_params, main


def test_tinyllama_shapes_give_its_1_1b_parameters_and_the_linear_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES["tinyllama"]))
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384  # TinyLlama-1.1B-Chat-v1.0
    linear = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    body, head = linear_params(SHAPES["tinyllama"])
    assert (body + head, head) == (sum(linear), model.lm_head.weight.numel())


def test_smoke_run_on_cpu_trains_through_desctunes_plan(capsys):
    results = main(["--shapes", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "4",
                    "--max-len", "96"])
    assert [r["arm"] for r in results] == ["bf16"]
    r = results[0]
    assert r["plan"]["base_dtype"] == "bfloat16" and r["real"] > r["supervised"] > 0
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and math.isfinite(r["flops"])
    assert "bf16_tokens_per_s=" in capsys.readouterr().out
