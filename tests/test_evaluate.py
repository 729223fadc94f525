"""Evaluate: scores, batched generation, and the adapter guard that catches the "fine-tuned == base" bug."""

import pytest
import torch

from desctune.config import ModelConfig
from desctune.inference import AdapterError, adapter_status, base_context, generate
from tasks.evaluate import guard, score


def test_scores_reward_the_reference_and_count_better_worse():
    refs = ["a sturdy steel kettle that boils water fast", "soft cotton shirt in blue"]
    df, m = score(refs, {"base": ["a phone", "soft cotton shirt in blue"], "finetuned": refs})
    assert m["finetuned"]["bleu"] == pytest.approx(100.0)
    assert m["finetuned"]["rougeL"] == pytest.approx(1.0)
    assert m["base"]["rougeL"] < 1.0
    assert (m["better"], m["worse"], m["same"]) == (1, 0, 1)
    assert m["identical_outputs"] == 0.5
    assert list(df.columns[:1]) == ["reference"] and "delta_rougeL" in df


def peft_tiny(tiny_model_dir, init_nonzero: bool):
    from peft import LoraConfig, get_peft_model

    from tasks.base_model import load_model

    model = get_peft_model(load_model(tiny_model_dir, ModelConfig(name=str(tiny_model_dir))),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    if init_nonzero:
        torch.manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def test_guard_rejects_zero_adapter_and_identical_outputs(tiny_model_dir):
    zero = adapter_status(peft_tiny(tiny_model_dir, init_nonzero=False))
    assert zero["loaded"] and zero["lora_parameters"] > 0 and not zero["nonzero"]
    with pytest.raises(AdapterError, match="all zero"):
        guard(zero, {"identical_outputs": 0.0})
    trained = adapter_status(peft_tiny(tiny_model_dir, init_nonzero=True))
    with pytest.raises(AdapterError, match="equal the base outputs on 95%"):
        guard(trained, {"identical_outputs": 0.95})
    guard(trained, {"identical_outputs": 0.5})


def test_batched_generation_matches_one_at_a_time_and_adapter_toggle_changes_output(tiny_model_dir, tiny_tokenizer):
    model = peft_tiny(tiny_model_dir, init_nonzero=True)
    titles = ["Blue Mug", "Acme Stainless Steel Kettle 1.7 Litre with Auto Off", "Shirt"]
    batched = generate(model, tiny_tokenizer, titles, "Describe.", batch_size=3, max_new_tokens=10)
    single = [generate(model, tiny_tokenizer, [t], "Describe.", batch_size=1, max_new_tokens=10)[0] for t in titles]
    assert batched == single
    with base_context(model):
        base = generate(model, tiny_tokenizer, titles, "Describe.", batch_size=3, max_new_tokens=10)
    assert base != batched
