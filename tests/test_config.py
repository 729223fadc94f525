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


def test_the_auto_fields_are_choices_in_the_form_and_keep_their_values():
    """Prefect's form shows a `const` branch as a field that cannot be changed: the three fields with an `auto`
    offer it as a choice beside the others, and their values (and so the stage keys) stay what they were."""
    import json

    train = Config.model_json_schema()["$defs"]["TrainConfig"]["properties"]
    assert "\"const\":" not in json.dumps(train)
    for name in ("gradient_checkpointing", "compile"):
        assert train[name]["enum"] == ["auto", True, False] and train[name]["default"] == "auto"
        for raw, value in (("auto", "auto"), ("true", True), ("false", False)):
            assert getattr(load_config(None, [f"train.{name}={raw}"]).train, name) is value
        with pytest.raises(ConfigError, match=f"train.{name}"):
            load_config(None, [f"train.{name}=sometimes"])
    budget = train["max_tokens_per_batch"]
    assert [b.get("enum", b["type"]) for b in budget["anyOf"]] == ["integer", ["auto"], "null"]
    for raw, value in (("auto", "auto"), ("512", 512), ("null", None)):
        assert load_config(None, [f"train.max_tokens_per_batch={raw}"]).train.max_tokens_per_batch == value
    with pytest.raises(ConfigError, match="max_tokens_per_batch"):
        load_config(None, ["train.max_tokens_per_batch=8"])
    # the same settings hash as they did when these fields were plain unions (a field added to the section changes
    # these, and the stage keys with them)
    assert load_config(ROOT / "configs" / "cpu.yaml").train.digest() == "39419e7a314a510e"
    assert load_config(None, ["train.compile=true"]).train.digest() == "b5297036722d82af"
    assert load_config(None, ["train.max_tokens_per_batch=null", "train.gradient_checkpointing=false"]).train.digest() \
        == "918b8877a9c5112a"
