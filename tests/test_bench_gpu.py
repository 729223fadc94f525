"""bench/train_gpu.py: TinyLlama-1.1B's shapes are exact, and the benchmark's code runs end to end (on the CPU here,
with tiny shapes and compiled layers through the eager backend; the 4-bit base and the TRL arm need CUDA)."""

import math
import subprocess
import sys
from pathlib import Path

import torch

import desctune.training.model
from desctune.training.memory import ModelShape
from bench.train_gpu import SHAPES, linear_params, main

ROOT = Path(__file__).resolve().parents[1]


def test_tinyllama_shapes_give_its_1_1b_parameters_and_the_linear_counts():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES["tinyllama"]))
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384  # TinyLlama-1.1B-Chat-v1.0
    linear = [m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    body, head = linear_params(SHAPES["tinyllama"])
    assert (body + head, head) == (sum(linear), model.lm_head.weight.numel())
    shape = ModelShape.from_config(LlamaConfig(**SHAPES["tinyllama"]))
    assert shape.body_linear_params == body and shape.body_linear_params + shape.other_params == 1_100_048_384


def test_smoke_run_on_cpu_trains_the_seed_and_auto_arms_through_desctunes_plan(capsys, monkeypatch):
    monkeypatch.setattr(desctune.training.model, "COMPILE_BACKEND", "eager")
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


def run_gpu_check(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """bench/gpu_check.sh without wheels or a card, logging into tmp_path/out (conftest.py's `gpu_check_started`
    begins it ahead of the test)."""
    from conftest import SESSION_ENV

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**SESSION_ENV, "OUT": str(tmp_path / "out"), "PATH": f"{bin_dir}:{SESSION_ENV['PATH']}",
           "DESCTUNE_BENCH_ARGS": "--shapes tiny --device cpu --steps 1 --warmup 1 --batch 4 --max-len 64"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "no-wheels")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return tmp_path / "out", proc


def test_gpu_check_script_runs_in_one_go_and_logs_into_out(gpu_check_started):
    """The script the GPU machine runs, here without wheels or a card: CUDA tests skip, the benchmark smoke-runs."""
    logs, proc = gpu_check_started.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no wheels in" in (logs / "pip.log").read_text()
    assert "skipped" in (logs / "pytest-cuda.log").read_text()
    bench = (logs / "bench-train-gpu.log").read_text().splitlines()
    assert bench[-2].startswith("ratio=") and bench[-1].startswith("benchmark: ")


def test_the_cuda_tests_collect_where_prefect_and_mlflow_are_not_installed():
    """The GPU machine has neither: the shared fixtures and the core library must not need them there."""
    code = ("import sys\n"
            "for name in ('prefect', 'mlflow'):\n"
            "    sys.modules[name] = None  # import fails, find_spec says not installed\n"
            "import pytest\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--collect-only', 'tests/test_cuda.py']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests collected" in proc.stdout
