"""Whether a scheduled deployment could run on this machine: a schedule whose every run can only fail (no CUDA for
a CUDA profile, no model weights, no data file, nothing registered to re-evaluate) is deployed paused instead, and
`serve` says why. Checked where `serve` (or `python -m deployments.deploy`) runs, which is where its worker runs.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from desctune.config import Config

# The evaluate-champion flow's own defaults, for a deployment that leaves its parameters out.
EVALUATE_FLOW = "flows/evaluate_champion.py:evaluate_champion"


def flow_defaults(entrypoint: str) -> dict:
    """A flow's parameter defaults (the deployment's parameters override them)."""
    if entrypoint != EVALUATE_FLOW:
        return {}
    from flows.evaluate_champion import evaluate_champion

    return {k: p.default for k, p in inspect.signature(evaluate_champion.fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except (ImportError, RuntimeError):
        return False


def model_missing(name: str, root: Path) -> str | None:
    """Why the base model `name` cannot be loaded here without a download, or None."""
    from desctune.errors import UserError
    from desctune.models import EMBEDDED, embedded_gguf

    if name in EMBEDDED:
        try:
            embedded_gguf(name)
            return None
        except UserError as exc:
            return str(exc)
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = root / local
    if local.is_dir():
        return None
    if "/" in name and not name.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None
        return f"model {name} is not in the Hugging Face cache (download it, or set model.name to a local folder)"
    return f"model {name} is not a folder here"


def data_missing(path: str, root: Path) -> str | None:
    if path.startswith("hf://"):
        return None
    p = Path(path).expanduser()
    return None if (p if p.is_absolute() else root / p).exists() else f"{path} is not there"


class CheckFailed(Exception):
    """A server answered a check with an error: it says nothing about what is or is not there."""


def alias_missing(cfg: Config, alias: str, env: dict) -> str | None:
    """Why models:/NAME@alias cannot be resolved in the registry the runs report to, or None. Asked with the
    credentials the runs get (`env`); any answer but "not there" (refused, unreachable) is a CheckFailed."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
    from mlflow.tracking import MlflowClient

    from desctune.tracking import hide_password, logged_in

    uri = cfg.registry.tracking_uri or env.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    try:
        with logged_in(env):
            MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(cfg.registry.model_name, alias)
        return None
    except MlflowException as exc:
        code, message = exc.error_code, str(exc)
        absent = code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
            code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and f"alias {alias} not found" in message)
        if not absent:
            first = hide_password(message.splitlines()[0] if message else type(exc).__name__)[:300]
            raise CheckFailed(f"asking the registry at {hide_password(uri)} for {cfg.registry.model_name}@{alias} "
                              f"failed: {first}") from None
    return f"no {cfg.registry.model_name}@{alias} in the registry yet (a finetune run that beats the base makes one)"


def blockers(deployment: dict, root: Path, env: dict) -> list[str]:
    """Reasons every run of this deployment would fail on this machine; empty when it can run."""
    params = {**flow_defaults(deployment["entrypoint"]), **(deployment.get("parameters") or {})}
    if deployment["entrypoint"] == EVALUATE_FLOW:  # that flow makes its config from its own parameters
        from flows.evaluate_champion import scoring_config

        cfg = scoring_config(*(params[k] for k in ("model_name", "generation", "artifacts_dir", "experiment")))
    else:
        raw = params.get("config")
        cfg = raw if isinstance(raw, Config) else Config.model_validate(raw or {})
    reasons = []
    if cfg.model.device == "cuda" and not cuda_available():
        reasons.append("needs CUDA (model.device: cuda) and no CUDA device is visible")
    missing_model = model_missing(cfg.model.name, root)
    if missing_model:
        reasons.append(missing_model)
    data = params.get("dataset") or cfg.data.path
    missing_data = data_missing(str(data), root)
    if missing_data:
        reasons.append(missing_data)
    if "alias" in params:
        missing_alias = alias_missing(cfg, params["alias"], env)
        if missing_alias:
            reasons.append(missing_alias)
    return reasons
