"""Training in two torchrun processes against one process, same global batch, on the embedded SmolLM2.

Both arms train the same LoRA on the same real examples (bench/train.py's: the shipped sample, cleaned and tokenized
by the stage code, max_seq_len 256) in batches of 8 with grad_accum 2, so each optimizer step takes 16 examples:
one process runs both micro-batches, two processes (gloo on the CPU, NCCL on CUDA) one each, with the gradients
all-reduced. Tokens/s counts real tokens over the summed optimizer-step time (model loading and process start
excluded; the wall time of each arm, which includes them, is printed too). The adapters of the two arms are compared:
the largest absolute difference of a LoRA weight is the last figure.

    python -m bench.distributed [--examples 64] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.train import tokenized


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)

    from desctune.training.launch import train_under_torchrun
    from desctune.training.loop import train_adapter

    results, walls = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        tmp = Path(tmp)
        tokens, base, cfg = tokenized(tmp, args.examples)
        cfg = cfg.model_copy(update={"model": cfg.model.updated(dtype=args.dtype),
                                     "lora": cfg.lora.updated(dropout=0.0),
                                     "train": cfg.train.updated(grad_accum=2, compile=False)})
        t0 = time.perf_counter()
        results["one"] = train_adapter(tokens, base, cfg, tmp / "one")
        walls["one"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        many_cfg = cfg.model_copy(update={"train": cfg.train.updated(nproc_per_node=args.nproc)})
        results["many"] = train_under_torchrun(tokens, base, many_cfg, tmp / "many")
        walls["many"] = time.perf_counter() - t0
        one, many = (load_file(Path(results[arm]["adapter_path"]) / "adapter_model.safetensors")
                     for arm in ("one", "many"))
        diff = max(float((one[k] - many[k]).abs().max()) for k in one)
    rate = {arm: r["tokens_per_s"] for arm, r in results.items()}
    for arm, r in results.items():
        n = 1 if arm == "one" else args.nproc
        print(f"{n} process(es): {r['steps']} steps of 16 examples in {r['seconds']:.1f} s of steps "
              f"({walls[arm]:.0f} s wall, start and model loading included), {rate[arm]:.0f} real tokens/s, "
              f"{r['supervised_tokens_per_s']:.0f} supervised tokens/s, loss {r['train_loss_last']:.4f}, "
              f"{r['dtype']} on {r['device']}")
    print(f"ratio={rate['many'] / rate['one']:.2f} nproc={args.nproc} one_tokens_per_s={rate['one']:.0f} "
          f"many_tokens_per_s={rate['many']:.0f} one_wall_s={walls['one']:.0f} many_wall_s={walls['many']:.0f} "
          f"max_adapter_difference={diff:.1e} examples={args.examples} threads={torch.get_num_threads()}")
    return {"results": results, "walls": walls, "difference": diff}


if __name__ == "__main__":
    main()
