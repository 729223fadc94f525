"""How much GPU memory a LoRA training step needs, and the cheapest-to-run plan that fits the card.

A pure function of the model's shape, the LoRA rank and targets, the token budget and the free memory, so every
decision the CUDA plan makes is tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from desctune.training.ops import HEAD_BYTES_PER_LOGIT, head_chunk_rows

# Activation bytes per token and decoder layer, eager bf16 with LoRA on every linear layer and dropout: per hidden
# unit and per MLP unit, fitted to TinyLlama-1.1B's peak memory on an H200 (bench/train_gpu.py); compiled layers
# need less, so for them this is an upper bound.
ACT_BYTES_PER_HIDDEN, ACT_BYTES_PER_INTERMEDIATE = 28, 11
# With gradient checkpointing a layer keeps only its bf16 input (with slack) until it is recomputed.
CKPT_BYTES_PER_HIDDEN = 4
NF4_BYTES = 0.52  # 4 bits per weight plus the double-quantized absmax of each 64
LORA_STATE_BYTES = 16  # fp32 weight, gradient and AdamW's two moments
USABLE_SHARE, RESERVED_BYTES = 0.9, 2**30  # of the free memory; CUDA context, allocator slack, compile workspace
AUTO_TOKEN_BUDGET = 16384  # padded tokens per micro-batch on CUDA: 32 x 512, ~75 of the sample's typical examples
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know of a decoder-only model (Llama naming, as in its config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> ModelShape:
        heads = config.num_attention_heads
        return cls(
            hidden=config.hidden_size,
            intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def body_linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_dims().values())

    @property
    def other_params(self) -> int:
        """Embeddings, head (unless tied) and norms: what 4-bit quantization leaves in floating point."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        dims = self.linear_dims()
        return self.layers * sum(r * sum(dims.get(name, (self.hidden, self.hidden))) for name in targets)


def estimate_memory(shape: ModelShape, base_dtype: str, lora_r: int, targets: list[str], tokens: int,
                    checkpointing: bool, head_rows: int) -> int:
    """Bytes a training step needs on the card: base weights (NF4 keeps embeddings, head and norms in fp32 after
    k-bit preparation), LoRA weights + gradients + AdamW state, the activations of a `tokens`-token micro-batch (every
    layer's, or with checkpointing the layer inputs plus one layer's), and the head's chunk of fp32 logits."""
    if base_dtype == "nf4":
        base = shape.body_linear_params * NF4_BYTES + shape.other_params * 4
    else:
        base = (shape.body_linear_params + shape.other_params) * (4 if base_dtype == "float32" else 2)
    lora = shape.lora_params(lora_r, targets) * LORA_STATE_BYTES
    layer = tokens * (ACT_BYTES_PER_HIDDEN * shape.hidden + ACT_BYTES_PER_INTERMEDIATE * shape.intermediate)
    if checkpointing:
        activations = tokens * shape.layers * CKPT_BYTES_PER_HIDDEN * shape.hidden + layer
    else:
        activations = shape.layers * layer
    head = head_rows * shape.vocab * HEAD_BYTES_PER_LOGIT + tokens * shape.hidden * 8
    return int(base + lora + activations + head)


@dataclass(frozen=True)
class MemoryPlan:
    base_dtype: str
    gradient_checkpointing: bool
    max_tokens_per_batch: int
    estimate_bytes: int
    usable_bytes: int
    reason: str


def memory_plan(shape: ModelShape, free_bytes: int, dtype: str, lora_r: int, targets: list[str],
                quantization: str = "auto", checkpointing: bool | str = "auto", budget: int | str = "auto",
                min_tokens: int = 512) -> MemoryPlan:
    """The CUDA memory decisions, a pure function of the model's shape, the LoRA, the budget and the free memory.

    Explicit settings are kept; auto ones are tried cheapest-to-run first, the first that fits wins: the compute
    dtype's base without checkpointing, with it, then NF4 without and with; an auto token budget starts at
    AUTO_TOKEN_BUDGET and halves (down to `min_tokens`) only when none of those fits."""
    usable = int(free_bytes * USABLE_SHARE - RESERVED_BYTES)
    rows = head_chunk_rows("cuda", shape.vocab, free_bytes)
    bases = {"auto": [dtype, "nf4"], "nf4": ["nf4"], "none": [dtype]}[quantization]
    ckpts = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    budgets = [budget] if budget != "auto" else []
    tokens = AUTO_TOKEN_BUDGET
    while budget == "auto" and (not budgets or tokens >= min_tokens):
        budgets.append(max(tokens, min_tokens))
        tokens //= 2
    tried = []
    for tokens in budgets:
        for base in bases:
            for ckpt in ckpts:
                need = estimate_memory(shape, base, lora_r, targets, tokens, ckpt, rows)
                tried.append((base, ckpt, tokens, need))
                if need <= usable:
                    return MemoryPlan(base, ckpt, tokens, need, usable, memory_reason(tried, usable, free_bytes))
    base, ckpt, tokens, need = tried[-1]
    return MemoryPlan(base, ckpt, tokens, need, usable, memory_reason(tried, usable, free_bytes, fits=False))


def memory_reason(tried: list[tuple[str, bool, int, int]], usable: int, free: int, fits: bool = True) -> str:
    """One line: the choice, its estimate against the free memory, and the cheaper-to-run choice it replaced."""
    def name(base, ckpt, tokens):
        return f"{base} base, {'with' if ckpt else 'no'} gradient checkpointing, {tokens}-token batches"

    base, ckpt, tokens, need = tried[-1]
    line = f"{name(base, ckpt, tokens)}: needs ~{need / GIB:.1f} GiB of {free / GIB:.1f} GiB free"
    if not fits:
        return line + " and may not fit: lower train.max_tokens_per_batch or set model.quantization=nf4"
    if len(tried) > 1:
        line += f" ({name(*tried[0][:3])} would need ~{tried[0][3] / GIB:.1f} GiB, over {usable / GIB:.1f} usable)"
    return line
