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


def test_a_warmup_that_takes_every_step_is_refused_before_training():
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "cpu.yaml", ["train.max_steps=1"])
    assert str(info.value) == (
        "invalid config at train: train.warmup_ratio 0.05 makes all 1 step(s) of train.max_steps warmup, so the "
        "learning rate never reaches train.learning_rate and its one step trains at rate 0: set "
        "train.warmup_ratio=0 or raise train.max_steps (1 error(s))")
    with pytest.raises(ConfigError, match="all 10 step"):
        load_config(None, ["train.max_steps=10", "train.warmup_ratio=0.95"])
    assert load_config(None, ["train.max_steps=1", "train.warmup_ratio=0"]).train.max_steps == 1
    assert load_config(None, ["train.max_steps=2"]).train.warmup_ratio == 0.05  # one warmup step, one at full rate
    assert load_config(None, ["train.warmup_ratio=0.9"]).train.max_steps is None  # epochs: steps follow the data


def test_field_descriptions_say_what_a_field_means_not_how_it_was_measured():
    """The Prefect UI shows them in its run form: no results, comparisons or pointers to the README there."""
    import re

    history = re.compile(r"README|measured|tried|\bcost\b|\bvs\b|\d+(\.\d+)? ?(s|min)\b|on the shipped data")
    found = [(section, name, prop["description"])
             for section, schema in Config.model_json_schema()["$defs"].items()
             for name, prop in schema["properties"].items() if history.search(prop.get("description", ""))]
    assert found == []
