"""Write a merged Llama-architecture checkpoint as GGUF the way llama.cpp's own converter does.

Same metadata keys, tensor names, Q/K row permutation, token list and token types as `convert_hf_to_gguf.py` writes
for a Llama model with a byte-level BPE tokenizer (SmolLM2, Llama 3, Qwen-style vocabularies), so llama.cpp, Ollama
and transformers' GGUF loader read it. 1-D tensors (norms) stay F32, as llama.cpp keeps them; 2-D weights take the
requested type, and a weight whose rows do not split into Q8_0 blocks falls back to F16, as llama.cpp does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from desctune.errors import ExportError

log = logging.getLogger(__name__)

QUANTS = ("f16", "bf16", "q8_0")
# Pre-tokenizer names llama.cpp gives the byte-level BPE vocabularies it recognises, by base model.
PRE_TOKENIZERS = {"smollm2-135m-instruct": "smollm", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm",
                  "HuggingFaceTB/SmolLM2-360M-Instruct": "smollm", "HuggingFaceTB/SmolLM2-1.7B-Instruct": "smollm"}
# general.* keys worth carrying over from the GGUF a base model came from (its license, maker, languages).
CARRIED = ("general.organization", "general.license", "general.languages", "general.size_label", "general.basename")


def qtypes(quant: str):
    """(file type, GGML type for 2-D weights) of a --quant name."""
    import gguf

    table = {
        "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
        "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
        "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    }
    if quant not in table:
        raise ExportError(f"unknown GGUF type {quant!r}: use one of {', '.join(QUANTS)}")
    return table[quant]


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's row order for Q and K (its RoPE pairs neighbouring rows, Hugging Face's pairs the two halves)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their GGUF token types, as llama.cpp's get_vocab_base() makes them."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend.get("model", {}).get("type") != "BPE" or backend["model"].get("byte_fallback"):
        raise ExportError(f"GGUF export writes byte-level BPE vocabularies only; {model_dir} has a "
                          f"{backend.get('model', {}).get('type')} tokenizer: export --format hf and convert it with "
                          f"llama.cpp's convert_hf_to_gguf.py")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].special or (reverse[i].startswith("<|") and reverse[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def source_metadata(gguf_path: Path | None) -> dict:
    """The CARRIED fields of the GGUF the base came from, where it came from one."""
    if gguf_path is None or not gguf_path.is_file():
        return {}
    with open(gguf_path, "rb") as f:
        found = read_fields(f, set(CARRIED), gguf_path)
    return {k: found[k] for k in CARRIED if k in found}


# struct formats of GGUF's scalar value types (GGUFValueType: 8 is a string, 9 an array)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_fields(f, wanted: set[str], name: Path) -> dict:
    """The `wanted` key-value fields of a GGUF file, read from its header up to the last of them and stepping over
    the others unparsed (gguf.GGUFReader makes Python objects of every field, the vocabulary's ~100k strings too).
    Values as GGUFReader's `contents()` gives them: numbers, strings, lists of those."""
    import struct

    def number(fmt: str):
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def value(kind: int, keep: bool):
        if kind == 8:
            size = number("<Q")
            return f.read(size).decode("utf-8") if keep else f.seek(size, 1)
        if kind == 9:
            item, count = number("<I"), number("<Q")
            if not keep and item in SCALARS:
                return f.seek(count * struct.calcsize(SCALARS[item]), 1)
            return [value(item, keep) for _ in range(count)]
        if kind not in SCALARS:
            raise ExportError(f"{name}: unknown GGUF value type {kind}")
        return number(SCALARS[kind])

    if f.read(4) != b"GGUF":
        raise ExportError(f"{name} is not a GGUF file")
    _version, _tensors, n_fields = number("<I"), number("<Q"), number("<Q")
    found: dict = {}
    for _ in range(n_fields):
        if found.keys() == wanted:
            break
        key = f.read(number("<Q")).decode("utf-8")
        keep = key in wanted
        got = value(number("<I"), keep)
        if keep:
            found[key] = got
    return found


def llama_hparams(model_dir: Path) -> dict:
    """The checkpoint's config.json, refused unless it is a Llama-architecture model."""
    hp = json.loads((model_dir / "config.json").read_text())
    if hp.get("model_type") != "llama":
        raise ExportError(f"GGUF export writes Llama-architecture models; {model_dir} is {hp.get('model_type')!r}")
    return hp


def add_model_metadata(w, hp: dict, name: str, base: dict, source_gguf: Path | None, file_type) -> None:
    """The general.* keys (with those carried over from the base's own GGUF) and the Llama hyperparameters."""
    import gguf

    n_head = hp["num_attention_heads"]
    rope = hp.get("rope_parameters") or {}
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_finetune("desctune")
    w.add_base_model_count(1)
    w.add_base_model_name(0, base["name"])
    for key, value in source_metadata(source_gguf).items():
        w.add_array(key, value) if isinstance(value, list) else w.add_string(key, str(value))
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp.get("num_key_value_heads") or n_head)
    w.add_rope_freq_base(float(rope.get("rope_theta", hp.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    w.add_file_type(file_type)
    w.add_vocab_size(hp["vocab_size"])
    w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // n_head)


def add_tokenizer(w, model_dir: Path, vocab_size: int, pre_tokenizer: str) -> int:
    """The byte-level BPE vocabulary, its merges and special tokens; returns how many tokens."""
    import gguf

    tokens, types = vocabulary(model_dir, vocab_size)
    w.add_add_space_prefix(False)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    if special.add_special_token.get("bos") is None:
        special.add_special_token["bos"] = False
    special.add_to_gguf(w, quiet=True)
    return len(tokens)


def add_tensors(w, model_dir: Path, hp: dict, weight_type,
                progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Every tensor under its GGUF name, Q and K rows permuted, 1-D ones in F32 and 2-D ones in `weight_type` (F16
    where rows do not split into its blocks); returns how many tensors of each type."""
    import gguf
    import torch
    from safetensors import safe_open

    n_head = hp["num_attention_heads"]
    n_kv = hp.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["num_hidden_layers"])
    keys = []
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            keys += [(f, k) for k in st.keys()]  # noqa: SIM118 (safe_open is not iterable)
    counts: dict[str, int] = {}
    for done, (file, key) in enumerate(keys, 1):
        with safe_open(file, "pt") as st:
            data = st.get_tensor(key).to(torch.float32).numpy()
        if key == "lm_head.weight" and hp.get("tie_word_embeddings"):
            continue
        if key.endswith(".self_attn.q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif key.endswith(".self_attn.k_proj.weight"):
            data = permute(data, n_head, n_kv)
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"no GGUF name for tensor {key} of {model_dir}")
        qtype = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else weight_type
        try:
            stored = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:
            qtype = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, qtype)
        w.add_tensor(new, stored, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
        if progress is not None:
            progress(done, len(keys))
    return counts


def write_gguf(model_dir: str | Path, out: str | Path, quant: str, name: str, base: dict,
               source_gguf: Path | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the Hugging Face Llama checkpoint in `model_dir` as one GGUF file; returns what was written."""
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    file_type, weight_type = qtypes(quant)
    hp = llama_hparams(model_dir)
    pre_tokenizer = PRE_TOKENIZERS.get(base["name"], "default")
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_model_metadata(w, hp, name, base, source_gguf, file_type)
    n_tokens = add_tokenizer(w, model_dir, hp["vocab_size"], pre_tokenizer)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts = add_tensors(w, model_dir, hp, weight_type, progress)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(out), "bytes": out.stat().st_size, "tensor_types": counts, "tokens": n_tokens,
            "pre_tokenizer": pre_tokenizer}
