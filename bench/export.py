"""Export sizes and load times: the embedded SmolLM2-135M-Instruct with a LoRA adapter (r=32 on every linear layer,
seeded, non-zero), exported as a merged Hugging Face folder and as GGUF f16 and q8_0.

Baseline, measured in the same run: loading the adapter model the way evaluate and the registered model do (base
checkpoint + PEFT adapter). Prints each export's size, export time, load time (and its ratio to the baseline's) and
on how many of the real titles its greedy output equals the adapter model's.

    python -m bench.export [--titles 10] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.generate import lora_model, real_titles, timed
from desctune.config import Config
from desctune.evaluation.generation import generate, load_adapter_model
from desctune.export.adapter import export_adapter
from desctune.models import load_tokenizer, provision

ROOT = Path(__file__).resolve().parents[1]


def save_adapter(out: Path, base: dict, cfg: Config) -> Path:
    """The seeded adapter as training leaves it: PEFT files, tokenizer and desctune.json."""
    lora_model(base["path"]).save_pretrained(out)
    load_tokenizer(base["path"]).save_pretrained(out)
    meta = {"base_model": {k: base[k] for k in ("name", "sha256", "source")}, "system_prompt": cfg.model.system_prompt,
            "config": json.loads(cfg.model_dump_json(include={"model", "lora", "train"}))}
    (out / "desctune.json").write_text(json.dumps(meta))
    return out


def size(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    from transformers import AutoModelForCausalLM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--titles", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg, artifacts = Config(), ROOT / "artifacts"
    base = provision("smollm2-135m-instruct", artifacts)
    titles = real_titles(args.titles)
    system = cfg.model.system_prompt

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = save_adapter(tmp / "adapter", base, cfg)
        (model, tokenizer, _), t_base = timed(lambda: load_adapter_model(adapter, artifacts))

        def outputs(m) -> list[str]:
            return generate(m, tokenizer, titles, system, batch_size=1, max_new_tokens=args.max_new_tokens)

        expected = outputs(model)
        rows = [("adapter on base (baseline)", size(adapter), 0.0, t_base, len(titles))]
        for fmt, quant in (("hf", None), ("gguf", "f16"), ("gguf", "q8_0")):
            out = tmp / f"{fmt}-{quant}"
            _, t_export = timed(lambda: export_adapter(adapter, fmt, quant, out, artifacts, cfg.eval.model_dump(),
                                                       lambda m: "card"))
            extra = {"gguf_file": f"model-{quant}.gguf", "dtype": torch.float32} if fmt == "gguf" else {}
            loaded, t_load = timed(lambda: AutoModelForCausalLM.from_pretrained(out, **extra))
            same = sum(a == b for a, b in zip(outputs(loaded), expected, strict=True))
            rows.append((f"{fmt} {quant or base_dtype_name(out)}", size(out), t_export, t_load, same))

    print(f"{'export':28}{'size MB':>9}{'export s':>10}{'load s':>8}{'load/base':>10}{'same greedy':>13}")
    for name, mb, t_export, t_load, same in rows:
        print(f"{name:28}{mb:9.1f}{t_export:10.1f}{t_load:8.1f}{t_load / t_base:10.2f}{same:>9}/{len(titles)}")


def base_dtype_name(folder: Path) -> str:
    return json.loads((folder / "export.json").read_text())["dtype"]


if __name__ == "__main__":
    main()
