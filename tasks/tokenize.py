"""The tokenize task: chat-format train and val examples with loss on the answer only (`desctune.data.tokenize`)."""

from __future__ import annotations

from prefect import task

from desctune.config import ModelConfig
from desctune.data.tokenize import TOKENIZE_FIELDS, tokenize_splits
from desctune.stages import code_version, stage_folder
from desctune.store import localize, publish
from tasks.stage import STAGE_CACHE

CODE = code_version("tokenize")


@task(name="tokenize", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def tokenize(splits: dict, base: dict, model: ModelConfig, artifacts_dir: str, code: str = CODE) -> dict:
    """Tokenize train and val with the base model's chat template; writes tokens_{train,val}.parquet."""
    out_dir = stage_folder(artifacts_dir, "tokenize", splits["train"]["sha256"], splits["val"]["sha256"],
                           base["sha256"], model.subset(TOKENIZE_FIELDS))
    local = localize(artifacts_dir, {"splits": splits, "base": base})
    return publish(artifacts_dir, out_dir, tokenize_splits(local["splits"], local["base"], model, out_dir))
