"""What training leaves: the adapter folder (PEFT weights and config, tokenizer, desctune.json), byte-identical for
identical inputs so its hash names the training and not the run, and the loss curve."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from desctune.config import Config
from desctune.files import atomic_dir, atomic_path

log = logging.getLogger(__name__)

# The sections of the configuration that training reads, and that the adapter records as its own.
TRAIN_SECTIONS = ("model", "lora", "train")


def name_base(model, name: str) -> None:
    """Have PEFT record the base by its name, not by the folder it was loaded from (which lies under the artifacts
    folder), and the LoRA targets sorted, not in a set's order (which varies with the process's hash seed)."""
    causal_lm = model.get_base_model()
    causal_lm.name_or_path = causal_lm.config.name_or_path = name  # the model card's base_model and its tag
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
        config.target_modules = sorted(config.target_modules)


def save_adapter(model, tokenizer, base: dict, cfg: Config, path: Path) -> Path:
    """Write the adapter folder in place of `path` as a whole: the LoRA weights and PEFT config, the tokenizer, and
    desctune.json (the base by name and hash, the prompt, and the configuration sections training read)."""
    name_base(model, base["name"])
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "base_model": {k: base[k] for k in ("name", "sha256", "source")},
            "system_prompt": cfg.model.system_prompt,
            "max_seq_len": cfg.model.max_seq_len,
            "config": {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k in TRAIN_SECTIONS},
        }
        (tmp / "desctune.json").write_text(json.dumps(meta, indent=2))
    return path


def plot_loss(history: list[dict], path: Path, logger=log) -> str | None:
    """The loss curve as a PNG; skipped (None) where matplotlib is not installed, as on a bare GPU box."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed: no loss plot")
        return None

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
    return str(path)
