"""The one config model: profiles load, overrides apply, mistakes give one plain line."""

import pytest

from conftest import ROOT
from desctune.config import Config, ConfigError, load_config


def test_profiles_load_into_the_one_model():
    cpu = load_config(ROOT / "configs" / "cpu.yaml")
    gpu = load_config(ROOT / "configs" / "gpu-tinyllama.yaml")
    assert cpu.model.name == "smollm2-135m-instruct" and cpu.data.path == "data/amazon_titles_sample.jsonl"
    assert gpu.model.name == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and gpu.model.quantization == "auto"
    assert (gpu.lora.r, gpu.lora.alpha, gpu.lora.dropout) == (32, 64, 0.05)
    assert (gpu.train.learning_rate, gpu.train.epochs) == (3e-4, 2)
    assert (gpu.data.max_records, gpu.data.train_size) == (150_000, 15_000)


def test_set_overrides_parse_values_as_yaml():
    cfg = load_config(None, ["train.epochs=3", "eval.limit=null", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.epochs == 3 and cfg.eval.limit is None and cfg.lora.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.epochs"], "--set expects section.key=value"),
        (["train.nope=1"], "invalid config at train.nope"),
        (["train.learning_rate=-1"], "invalid config at train.learning_rate"),
    ],
)
def test_mistakes_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_missing_profile_and_digest_follow_content(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    assert Config().digest() == Config().digest() != load_config(None, ["train.seed=1"]).digest()


def test_generation_requests_are_bounded():
    from desctune.config import MAX_NEW_TOKENS, EvalConfig

    with pytest.raises(ConfigError, match="max_new_tokens"):
        load_config(None, [f"eval.max_new_tokens={MAX_NEW_TOKENS + 1}"])
    with pytest.raises(ConfigError, match="batch_size"):
        EvalConfig().updated(batch_size=100_000)


def test_the_schedule_and_attention_are_choices_and_optional_numbers_open_as_numbers():
    schema = Config.model_json_schema()["$defs"]
    assert "cosine" in schema["TrainConfig"]["properties"]["lr_scheduler"]["enum"]
    assert schema["ModelConfig"]["properties"]["attn_implementation"]["enum"] == ["sdpa", "eager", "flash_attention_2"]
    max_records = schema["DataConfig"]["properties"]["max_records"]
    assert "default" not in max_records and max_records["anyOf"][0]["type"] == "integer"
    assert max_records["anyOf"][-1] == {"type": "null"}
    assert load_config(None, ["data.max_records=null"]).data.max_records is None
    with pytest.raises(ConfigError, match="lr_scheduler"):
        load_config(None, ["train.lr_scheduler=cosine_annealing"])
