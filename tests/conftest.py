"""Shared fixtures: a tiny random Llama with a real BPE tokenizer and ChatML template (no downloads), and an isolated
Prefect + MLflow setup per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Set before Prefect is imported anywhere: every test session gets its own Prefect home, API database and result
# storage, the ephemeral API server, quiet logs, no hub access, and MLflow stores under each test's artifacts.
_HOME = Path(tempfile.mkdtemp(prefix="desctune-prefect-"))
# Registered before Prefect is imported, so it runs after Prefect's own exit handlers have stopped its server.
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.update(
    {
        "PREFECT_HOME": str(_HOME),
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{_HOME}/prefect.db",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_HOME / "storage"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        # The ephemeral API server gets 20 s to start by default: not always enough on 2 busy cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
for _var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)

# Prefect sets up logging once, when prefect.main is first imported, and its dictConfig closes the handlers already
# there. rouge-score's absl handler holds the sys.stderr of the moment it was imported: inside a test, pytest's
# capture of that test, which it would close and so break every later test. Set Prefect's logging up first. Where
# Prefect is not installed (the GPU machine runs tests/test_cuda.py on the core library alone) there is none to set.
try:
    import prefect.main  # noqa: E402,F401
except ModuleNotFoundError:
    pass

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
EVAL_DATA = ROOT / "data" / "amazon_titles_eval.jsonl"
ABT_DATA = ROOT / "data" / "abt_electronics.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_model(out: Path, vocab_size: int = 600, seed: int = 0) -> Path:
    """Train a small byte-level BPE on the shipped sample and save it with a random 2-layer Llama."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        texts += [rec["title"], rec["content"]]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from desctune.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def embedded_base() -> dict:
    """The embedded SmolLM2 checkpoint, converted once into the project's own artifacts/models cache."""
    from desctune.models import provision

    return provision("smollm2-135m-instruct", ROOT / "artifacts")


def tiny_config(tmp_path: Path, model_dir: Path, records: Path = SAMPLE, **sections):
    """A Config for the tiny model that runs the whole flow in seconds."""
    from desctune.config import Config

    data = {"path": str(records), **sections.pop("data", {})}
    cfg = {
        "artifacts_dir": str(tmp_path / "artifacts"),
        "data": data,
        "model": {"name": str(model_dir), "max_seq_len": 128, **sections.pop("model", {})},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **sections.pop("lora", {})},
        "train": {"epochs": 1, "max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 5,
                  "logging_steps": 2, "num_workers": 0, **sections.pop("train", {})},
        "eval": {"limit": 6, "batch_size": 4, "max_new_tokens": 12, **sections.pop("eval", {})},
        "registry": {"model_name": "tiny-desctune", **sections.pop("registry", {})},
    }
    return Config.model_validate(cfg)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_records(src: Path, dest: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
    dest.write_text("".join(lines), encoding="utf-8")
    return dest
