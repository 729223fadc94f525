"""The registered MLflow model: the LoRA adapter plus the recipe to put it on its base and generate."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "title")]),
    outputs=Schema([ColSpec("string")]),
    params=ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", 128),
            ParamSpec("base", "boolean", False),
            ParamSpec("batch_size", "long", 16),
        ]
    ),
)


# MLflow logs the model from this file and carries the whole desctune package beside it (models-from-code).
MODEL_CODE = Path(__file__).with_name("pyfunc_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# What loading and generating import besides desctune itself.
RUNTIME = ("torch", "transformers", "peft", "mlflow", "pydantic", "pyyaml", "filelock", "gguf", "safetensors",
           "pandas", "accelerate")


def requirements(base_name: str) -> list[str]:
    """The model's pip requirements, pinned to what registered it, plus the wheel of an embedded base."""
    from importlib.metadata import PackageNotFoundError, version

    from desctune.models import EMBEDDED

    pins = []
    for package in RUNTIME:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    if base_name in EMBEDDED:
        wheel = EMBEDDED[base_name][0].replace("_", "-")
        try:
            pins.append(f"{wheel}=={version(wheel)}")
        except PackageNotFoundError:
            pins.append(wheel)
    return pins


def decoding_settings(model_config: dict | None) -> dict:
    """The registering run's eval section (the Config model's defaults for anything it does not name)."""
    from desctune.config import EvalConfig

    return EvalConfig.model_validate((model_config or {}).get("eval", {})).model_dump()


class DescTuneModel(mlflow.pyfunc.PythonModel):
    """Loads the base named in the adapter's desctune.json (provisioned under $DESCTUNE_ARTIFACTS) plus the adapter,
    and decodes with the evaluation settings of the run that registered it (its model_config)."""

    def load_context(self, context):
        from desctune.evaluation.generation import load_adapter_model

        artifacts_dir = os.environ.get("DESCTUNE_ARTIFACTS", "artifacts")
        self.model, self.tokenizer, self.meta = load_adapter_model(context.artifacts["adapter"], artifacts_dir)
        self.settings = decoding_settings(context.model_config)

    def predict(self, context, model_input, params=None):
        from desctune.config import EvalConfig
        from desctune.evaluation.generation import base_context, generate

        params = params or {}
        request = EvalConfig.model_validate(self.settings).updated(
            batch_size=int(params.get("batch_size", 16)), max_new_tokens=int(params.get("max_new_tokens", 128)))
        titles = model_input["title"].astype(str).tolist()
        settings = self.settings
        with base_context(self.model) if params.get("base", False) else contextlib.nullcontext():
            return generate(
                self.model,
                self.tokenizer,
                titles,
                self.meta["system_prompt"],
                batch_size=request.batch_size,
                max_new_tokens=request.max_new_tokens,
                repetition_penalty=float(settings["repetition_penalty"]),
                no_repeat_ngram_size=int(settings["no_repeat_ngram_size"]),
            )
