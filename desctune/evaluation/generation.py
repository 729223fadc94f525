"""Load one copy of the base weights with a LoRA adapter on top, and generate from it in batches.

Base and fine-tuned outputs come from the same weights: the adapter is disabled for the base and enabled for the
fine-tuned model, so the comparison can never silently load the base twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from desctune.config import ModelConfig
from desctune.data.tokenize import prompt_ids
from desctune.errors import AdapterError

log = logging.getLogger(__name__)


def adapter_meta(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "desctune.json"
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not a desctune adapter (no desctune.json)")
    return json.loads(path.read_text())


def load_adapter_model(adapter_dir: str | Path, artifacts_dir: str | Path = "artifacts", model_cfg: ModelConfig | None = None):
    """(peft model, tokenizer, meta): the adapter's base provisioned by name, the adapter loaded on top, eval mode."""
    from peft import PeftModel

    from desctune.models import load_model, load_tokenizer, provision

    meta = adapter_meta(adapter_dir)
    cfg = model_cfg or ModelConfig.model_validate(meta["config"]["model"])
    base = provision(meta["base_model"]["name"], artifacts_dir)
    if base["sha256"] != meta["base_model"]["sha256"]:
        raise AdapterError(
            f"the adapter was trained on {meta['base_model']['name']} with hash {meta['base_model']['sha256'][:12]}, "
            f"but the available base has hash {base['sha256'][:12]}"
        )
    tokenizer = load_tokenizer(adapter_dir)
    model = PeftModel.from_pretrained(load_model(base["path"], cfg), str(adapter_dir))
    model.eval()
    return model, tokenizer, meta


def adapter_status(model) -> dict:
    """What the demo and the guard show: is a LoRA adapter loaded and active, and how big is it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    config = next(iter(getattr(model, "peft_config", {}).values()), None)
    nonzero = any(bool(p.detach().abs().sum() > 0) for n, p in lora.items() if "lora_B" in n)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return {
        "loaded": bool(lora),
        "active": any(not m.disable_adapters and m.active_adapters for m in layers),
        "lora_parameters": int(sum(p.numel() for p in lora.values())),
        "target_modules": sorted(config.target_modules) if config is not None else [],
        "nonzero": nonzero,
    }


def base_context(model):
    """Context in which the peft model behaves as its base."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def context_length(model) -> int:
    """How many tokens the model attends over (prompt plus generated)."""
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def fit_prompts(tokenizer, titles: list[str], system_prompt: str, budget: int) -> list[list[int]]:
    """Each title's prompt ids, the title cut short where the prompt would leave less than the generation's room in
    the model's context (one warning says how many)."""
    prompts, cut = [], 0
    for title in titles:
        ids = prompt_ids(tokenizer, title, system_prompt)
        if len(ids) > budget:
            words = tokenizer(title, add_special_tokens=False)["input_ids"]
            keep = max(0, len(words) - (len(ids) - budget))
            ids = prompt_ids(tokenizer, tokenizer.decode(words[:keep]), system_prompt)[:max(budget, 1)]
            cut += 1
        prompts.append(ids)
    if cut:
        log.warning("%d title(s) cut short so that prompt and max_new_tokens fit the model's context (prompts of at "
                    "most %d tokens)", cut, budget)
    return prompts


def _ticks(progress: Callable[[float], None], done: int, batch: int, width: int, max_new_tokens: int):
    """A stopping criterion that stops nothing: after each generated token it reports the titles done so far,
    counting the batch in progress by the share of its token budget spent (`progress` decides whether a line is
    due)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Ticks(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            spent = (input_ids.shape[1] - width) / max(max_new_tokens, 1)
            progress(done + batch * min(spent, 0.99))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Ticks()])


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    titles: list[str],
    system_prompt: str,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    progress: Callable[[float], None] | None = None,
) -> list[str]:
    """Batched generation with left padding and KV cache; prompts are grouped by length to waste little padding.

    Runs in the weights' own dtype (fp32 on CPU): under bf16 autocast, batched and one-at-a-time greedy outputs
    differed on half of the benchmark's prompts, so a score would depend on the batch size.
    """
    device = next(model.parameters()).device
    prompts = fit_prompts(tokenizer, titles, system_prompt, context_length(model) - max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = prompts[i]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        kwargs = {"do_sample": do_sample, "repetition_penalty": repetition_penalty,
                  "no_repeat_ngram_size": no_repeat_ngram_size}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if progress is not None:  # within a batch too: a batch of long outputs can take minutes
            kwargs["stopping_criteria"] = _ticks(progress, start, len(idx), width, max_new_tokens)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
            use_cache=True,
            **kwargs,
        )
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress(min(start + batch_size, len(order)))
    return outputs
