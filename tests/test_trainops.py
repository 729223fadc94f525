"""The CPU fast path computes what the plain path computes: chunked head loss and gradient, dropout's distribution,
and LoRA layers that train exactly like PEFT's."""

import pytest
import torch
from torch import nn

from desctune.training.ops import (
    HeadCrossEntropy,
    LoraBranch,
    head_chunk_rows,
    head_cross_entropy,
    keep_mask,
    speed_up_lora,
)


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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head_cross_entropy(hidden.detach().requires_grad_(True), head, targets)
        plain = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    assert torch.allclose(autocast, plain, rtol=1e-3)


def test_head_chunks_are_cache_sized_on_the_cpu_and_memory_sized_on_a_card():
    assert head_chunk_rows("cpu", 49152) == 128
    assert head_chunk_rows("cuda", 32000, 80 * 10**9) == 4096  # 2.5 GB of logits: 7.8k rows, a power of two below
    assert head_chunk_rows("cuda", 32000, 140 * 10**9) == 8192
    assert head_chunk_rows("cuda", 32000, 10**9) == 256 and head_chunk_rows("cuda", 32000, 10**13) == 16384
    torch.manual_seed(0)
    head = nn.Linear(8, 30, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(9, 8), torch.randint(0, 30, (9,))
    chunked = head_cross_entropy(hidden, head, targets, chunk_rows=2)
    assert torch.allclose(chunked, head_cross_entropy(hidden, head, targets))


@pytest.mark.parametrize("source", ["numpy", "device"])
def test_keep_mask_keeps_1_minus_p_and_replays_under_a_seed(source):
    torch.manual_seed(3)
    keep = keep_mask(torch.Size([400, 500]), 0.1, torch.device("cpu"), source)
    assert keep.dtype == torch.bool and keep.shape == (400, 500)
    assert abs(float(keep.float().mean()) - 0.9) < 0.005
    torch.manual_seed(3)
    assert torch.equal(keep_mask(keep.shape, 0.1, keep.device, source), keep)
    assert not torch.equal(keep_mask(keep.shape, 0.1, keep.device, source), keep)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_mask(keep.shape, 1.0, keep.device, source)


@pytest.mark.parametrize("masked", [False, True])
def test_lora_branch_output_and_gradients_equal_the_plain_formula(masked):
    torch.manual_seed(0)
    p, scaling = 0.2, 2.0
    base_out = torch.randn(2, 5, 6, requires_grad=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    a, b = torch.randn(3, 8, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    keep = (torch.rand(2, 5, 8) > p) if masked else None
    scale = 1 / (1 - p) if masked else 1.0
    want = base_out + ((x * keep * scale) if masked else x) @ a.T @ b.T * scaling
    want_grads = torch.autograd.grad(want.square().sum(), (base_out, x, a, b))
    got = LoraBranch.apply(base_out, x, a, b, scaling * scale, keep)
    got_grads = torch.autograd.grad(got.square().sum(), (base_out, x, a, b))
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-4, rtol=1e-4)


def lora_model(model_dir, dropout):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    return get_peft_model(model, config)


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad}


@pytest.mark.parametrize("masks", ["numpy", "device"])
def test_fused_lora_layers_train_exactly_like_peft_and_leave_eval_to_it(tiny_model_dir, masks):
    ids = torch.randint(0, 100, (2, 12))
    plain, fused = lora_model(tiny_model_dir, 0.0).train(), lora_model(tiny_model_dir, 0.0).train()
    assert speed_up_lora(fused, masks) == 3 * fused.config.num_hidden_layers
    seen = []
    fused.base_model.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, out: seen.append(type(out.grad_fn).__name__))
    want_loss, want_grads = loss_and_grads(plain, ids)
    got_loss, got_grads = loss_and_grads(fused, ids)
    assert seen == ["LoraBranchBackward"]
    assert torch.allclose(got_loss, want_loss, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) == 6 * fused.config.num_hidden_layers
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-6, rtol=1e-4), name
    dropped = lora_model(tiny_model_dir, 0.3)
    speed_up_lora(dropped, masks)
    with torch.no_grad():
        evaluated = dropped.eval()(input_ids=ids).logits
        assert torch.equal(evaluated, dropped(input_ids=ids).logits)
        dropped.train()
        torch.manual_seed(5)
        first = dropped(input_ids=ids).logits
        assert not torch.allclose(first, evaluated)
        torch.manual_seed(5)
        assert torch.equal(dropped(input_ids=ids).logits, first)
    with pytest.raises(ValueError, match="masks"):
        speed_up_lora(dropped, "cuda")
