"""The one configuration model: data, model, lora, train, eval and registry sections.

The finetune flow takes `Config` as its parameter, so the Prefect UI renders it as a form; YAML profiles under
`configs/` load into the same model, and `--set section.key=value` overrides any field.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from desctune.errors import ConfigError

DEFAULT_SYSTEM_PROMPT = (
    "You are an e-commerce copywriter. Given a product title, write the product description."
)


# Upper bounds for what one generation call may ask for: beyond them a request costs minutes to hours and memory
# without a use (the registered model's parameters are held to the same).
MAX_GENERATION_BATCH = 256
MAX_NEW_TOKENS = 1024


def _optional_without_null_default(schema: dict) -> None:
    """JSON schema of a section for Prefect's parameter form: an optional field whose default is None gets no
    `default: null`, so the form opens it on its value type (an empty number box) instead of on its `null` branch,
    which it shows as 'Property is type "None"'. None is still valid (the schema keeps its `null` branch), and a field
    left empty takes the model's default."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and any(b.get("type") == "null" for b in prop.get("anyOf", [])):
            del prop["default"]
            prop["anyOf"] = [b for b in prop["anyOf"] if b.get("type") != "null"] + [{"type": "null"}]


# Prefect's run form shows a union branch that is a constant ("auto") as a field that "is a const and cannot be
# changed". The fields below keep their types for validation (and so their values and digests), and give the form
# choices it can select instead: one list for auto/true/false, a button per kind for a token budget.
AutoOrBool = Annotated[bool | Literal["auto"], WithJsonSchema({"enum": ["auto", True, False]})]
TokenBudget = Annotated[
    Annotated[int, Field(ge=16)] | Literal["auto"] | None,
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 16, "title": "tokens"},
                              {"type": "string", "enum": ["auto"], "title": "auto"},
                              {"type": "null", "title": "none"}]}),
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_optional_without_null_default)

    def digest(self) -> str:
        """A short stable hash of this section, for cache keys and registry tags."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def updated(self, **changes):
        """A validated copy with `changes` applied (model_copy does not validate); a bad value is a ConfigError."""
        return _validated(type(self), {**self.model_dump(), **changes})

    def subset(self, names: tuple[str, ...]) -> dict:
        """The named fields and their values: the part of a section that one stage's output depends on."""
        return {k: getattr(self, k) for k in names}


class DataConfig(Section):
    path: str = Field("data/amazon_titles_sample.jsonl", description="trn.json / .jsonl / .gz file to ingest")
    uid_field: str = "uid"
    title_field: str = "title"
    content_field: str = "content"
    max_records: int | None = Field(None, ge=1, description="read at most this many lines (empty or null: all)")
    max_field_chars: int = Field(20_000, ge=1, description="longer titles or contents are rejected")
    max_line_bytes: int = Field(
        16 << 20, ge=1024, description="longer input lines are rejected unread, so one line never fills memory"
    )
    filters: bool = Field(True, description="apply the length filters below")
    min_title_chars: int = Field(10, ge=0)
    min_content_chars: int = Field(100, ge=0)
    reject_blurbs: bool = Field(
        False, description="quarantine contents that are press praise (quoted reviews with their sources) as "
        "review_blurb: the model learns to invent such quotes from them"
    )
    strip_stubs: bool = Field(
        True, description='remove boilerplate such as "--This text refers to the Paperback edition." from contents'
    )
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    train_size: int | None = Field(None, ge=1, description="seeded sample of the train split (empty or null: all of it)")
    seed: int = 42

    def for_scoring(self, path: str) -> "DataConfig":
        """These settings for a file that models are judged on: every record that passes the quality filters counts,
        review blurbs included, since the blurb filter chooses what a model learns from, not what it is judged on."""
        return self.updated(path=str(path), reject_blurbs=False)


class ModelConfig(Section):
    name: str = Field("smollm2-135m-instruct", description="embedded model name, hub id or local path")
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_seq_len: int = Field(256, ge=16)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 where supported")
    quantization: Literal["auto", "none", "nf4"] = Field(
        "auto",
        description="base weights on CUDA: nf4 (QLoRA), none (the compute dtype), auto: none when it fits the card's "
        "free memory, else nf4. The CPU never quantizes",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="transformers' attention: sdpa (PyTorch's fused kernels), eager, or flash_attention_2 "
        "(CUDA with the flash-attn package)",
    )

    @model_validator(mode="before")
    @classmethod
    def _load_in_4bit_alias(cls, data: Any) -> Any:
        """`load_in_4bit` (deprecated) still loads: true means quantization nf4, false means none."""
        if isinstance(data, dict) and "load_in_4bit" in data:
            data = dict(data)
            four_bit = data.pop("load_in_4bit")
            data.setdefault("quantization", "nf4" if four_bit else "none")
        return data


class LoraConfig(Section):
    r: int = Field(32, ge=1)
    alpha: int = Field(64, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainConfig(Section):
    epochs: float = Field(2, gt=0)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps (empty or null: train the full epochs)")
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="examples per micro-batch where no token budget applies")
    max_tokens_per_batch: TokenBudget = Field(
        "auto", description="micro-batches of at most this many padded tokens (length-grouped); auto: sized to the "
        "card on CUDA, batch_size batches on CPU; none (null): batch_size batches everywhere",
    )
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="the first ceil(warmup_ratio x steps) optimizer steps raise the learning rate "
        "linearly from 0; with max_steps it must leave steps after the warmup"
    )
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = Field("cosine", description="transformers' learning-rate schedule after warmup_ratio of linear warmup")
    gradient_checkpointing: AutoOrBool = Field(
        "auto", description="auto: on CUDA only when the activations would not fit the card, never on CPU"
    )
    compile: AutoOrBool = Field(
        "auto", description="torch.compile each decoder layer; auto: on CUDA when one process trains on 10M tokens "
        "or more (enough steps to repay the compile time), else eager; eager on CPU"
    )
    save_steps: int = Field(50, ge=1, description="checkpoint every N optimizer steps")
    logging_steps: int = Field(5, ge=1)
    num_workers: int | None = Field(None, ge=0, description="dataloader workers (empty or null: sized to the machine)")
    seed: int = 42
    nproc_per_node: int = Field(
        1, ge=1, le=1024, description="training processes on this machine: 1 trains in the task's own process; more "
        "(one per GPU on CUDA) run data-parallel under torchrun, each on its share of every optimizer step's batch",
    )
    nnodes: int = Field(1, ge=1, le=1024, description="machines training together under torchrun")
    node_rank: int = Field(0, ge=0, description="this machine's place among nnodes; node 0 writes the checkpoints")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of node 0, where the machines meet (empty or null: this machine alone)",
    )
    launcher: Literal["auto", "torchrun"] = Field(
        "auto", description="auto: in-process for one process, torchrun for more; torchrun: always, even for one"
    )

    @model_validator(mode="after")
    def _warmup_ends(self) -> "TrainConfig":
        """A warmup as long as max_steps never reaches learning_rate, and a one-step run trains at rate 0: refused
        here rather than after training, as an adapter that learned nothing."""
        if self.max_steps is not None and math.ceil(self.warmup_ratio * self.max_steps) >= self.max_steps:
            at_zero = " and its one step trains at rate 0" if self.max_steps == 1 else ""
            raise ValueError(
                f"train.warmup_ratio {self.warmup_ratio:g} makes all {self.max_steps} step(s) of train.max_steps "
                f"warmup, so the learning rate never reaches train.learning_rate{at_zero}: set train.warmup_ratio=0 "
                "or raise train.max_steps"
            )
        return self

    @model_validator(mode="after")
    def _one_node_zero(self) -> "TrainConfig":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several machines (nnodes > 1) need rdzv_endpoint: host:port of node 0")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        return self

    @property
    def distributed(self) -> bool:
        """Whether training runs under torchrun rather than in the calling process."""
        return self.launcher == "torchrun" or self.nproc_per_node * self.nnodes > 1


class GenerationConfig(Section):
    """How the base and fine-tuned models generate when they are scored: the eval section without its file."""

    limit: int | None = Field(50, ge=1, description="test examples to generate for (None: all)")
    batch_size: int = Field(
        16, ge=1, le=MAX_GENERATION_BATCH, description="generation batch, independent of training's"
    )
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS, description="tokens each output may have at most")
    repetition_penalty: float = Field(
        1.0, ge=1.0, description="for base and fine-tuned alike; 1: off; above 1 it penalizes every token already in "
        "the prompt or the output, the title's own words included"
    )
    no_repeat_ngram_size: int = Field(3, ge=0, description="0: off; stops greedy decoding's loops")


class EvalConfig(GenerationConfig):
    test_path: str | None = Field(
        None, description="score the run on this file (cleaned like the training data, review blurbs kept; its "
        "first `limit` records) instead of its own test split; the registry's gate then judges on it"
    )


class RegistryConfig(Section):
    model_name: str = "desctune-smollm2"
    experiment: str = "desctune"
    tracking_uri: str | None = Field(None, description="empty or null: $MLFLOW_TRACKING_URI or the SQLite store in artifacts")
    metric: Literal["rougeL", "bleu"] = "rougeL"
    min_improvement: float = Field(
        0.0, ge=0, description="a version becomes champion only when the lower bounds of the paired 95% intervals "
        "of (version - base) and (version - champion) on `metric` are above this"
    )
    max_claim_increase: float = Field(
        0.0, ge=0, le=1, description="a version stays challenger when its share of outputs with an invented claim is "
        "significantly higher than the champion's (a first version: the base's): when the lower bound of the paired "
        "95% interval of the difference (0-1) is above this"
    )


class Config(Section):
    artifacts_dir: str = "artifacts"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)



def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[leaf] = _parse_value(raw)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML profile (or the defaults), apply overrides, validate into one `Config`."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections")
    return _validated(Config, apply_overrides(data, overrides or []))


def _validated(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        msg = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]  # a validator's own words
        raise ConfigError(f"invalid config at {where}: {msg} ({exc.error_count()} error(s))") from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)
