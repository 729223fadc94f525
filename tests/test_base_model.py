"""Base model provisioning: the embedded GGUF becomes a plain checkpoint once; missing models give one sentence."""

import json
from pathlib import Path

import pytest

from conftest import ROOT
from desctune.config import ModelConfig
from desctune.errors import ModelError
from desctune.models import compute_dtype, provision


def test_local_path_is_used_as_is_and_hashed(tiny_model_dir, tmp_path):
    got = provision(str(tiny_model_dir), tmp_path)
    assert got["path"] == str(tiny_model_dir.resolve()) and len(got["sha256"]) == 64 and got["source"] == "local"


def test_unknown_hub_id_offline_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as info:
        provision("TinyLlama/TinyLlama-1.1B-Chat-v1.0", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "set model.name to" in msg and "TinyLlama/TinyLlama-1.1B-Chat-v1.0" in msg


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        provision(str(tmp_path / "empty"), tmp_path)


def test_cpu_dtype_follows_config():
    assert str(compute_dtype(ModelConfig(dtype="fp32"), "cpu")) == "torch.float32"
    assert str(compute_dtype(ModelConfig(dtype="bf16"), "cpu")) == "torch.bfloat16"


@pytest.mark.slow
def test_embedded_model_converts_once_and_chats(embedded_base):
    """The real embedded SmolLM2: converted to safetensors with its ChatML template, cached by the GGUF hash."""
    from transformers import AutoModelForCausalLM

    from desctune.models import load_tokenizer

    got = embedded_base
    config = json.loads((Path(got["path"]) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = load_tokenizer(got["path"])
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(got["path"])
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert provision("smollm2-135m-instruct", ROOT / "artifacts") == got


def test_a_missing_model_fails_at_once_instead_of_being_retried(tmp_path, monkeypatch):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.base_model import base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    @flow
    def provision_only() -> tuple[str, str]:
        state = base_model("nobody/no-such-model", str(tmp_path), return_state=True)
        return str(state.state_details.task_run_id), type(state.result(raise_on_failure=False)).__name__

    task_run_id, error = provision_only()
    assert error == "ModelError"
    with get_client(sync_client=True) as client:
        assert client.read_task_run(task_run_id).run_count == 1
