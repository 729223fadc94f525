"""The CPU fast path computes what the plain path computes: chunked head loss and gradient, dropout's distribution,
and a LoRA model whose inputs are no longer up-cast."""

import pytest
import torch
from torch import nn

from desctune.trainops import BitsDropout, HeadCrossEntropy, head_cross_entropy, speed_up_lora


def reference(hidden, weight, targets):
    h = hidden.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy((h @ weight.T).float(), targets, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_head_loss_and_gradient_equal_full_logits_cross_entropy(dtype, tol):
    torch.manual_seed(0)
    hidden = torch.randn(11, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype)
    targets = torch.randint(0, 50, (11,))
    want_loss, want_grad = reference(hidden, weight, targets)
    loss = HeadCrossEntropy.apply(hidden, weight, targets, 4)  # 4 + 4 + 3 rows
    (loss * 0.5).backward()
    assert torch.allclose(loss, want_loss, rtol=tol)
    assert hidden.grad.dtype == dtype
    assert torch.allclose(hidden.grad.float(), 0.5 * want_grad.float(), atol=tol, rtol=tol)


def test_head_loss_uses_the_plain_path_when_the_head_trains_and_needs_no_gradient_in_eval():
    torch.manual_seed(0)
    head = nn.Linear(8, 30, bias=False)
    hidden, targets = torch.randn(5, 8, requires_grad=True), torch.randint(0, 30, (5,))
    head_cross_entropy(hidden, head, targets).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    head.weight.requires_grad_(False)
    with torch.no_grad():
        chunked = head_cross_entropy(hidden, head, targets)
    assert torch.allclose(chunked, nn.functional.cross_entropy(head(hidden), targets, reduction="sum"), rtol=1e-5)
    assert head_cross_entropy(hidden[:0], head, targets[:0]) == 0


def test_bits_dropout_drops_p_of_the_inputs_keeps_the_mean_and_replays_under_a_seed():
    x = torch.ones(400, 500, requires_grad=True)
    drop = BitsDropout(0.1).train()
    torch.manual_seed(3)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.005
    assert abs(float(y.detach().mean()) - 1.0) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert not torch.equal(drop(x), y)
    assert drop.eval()(x) is x
    assert BitsDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        BitsDropout(1.0)


def test_speed_up_lora_swaps_dropouts_and_keeps_the_outputs(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(model, config, autocast_adapter_dtype=True).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    assert speed_up_lora(model) == 2 * model.config.num_hidden_layers
    kinds = {type(d).__name__ for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()}
    assert kinds == {"BitsDropout"}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
