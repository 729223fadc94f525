"""The tokenize task: chat-format train and val examples with loss on the answer only (`desctune.data.tokenize`)."""

from __future__ import annotations

from prefect import task

from desctune.config import ModelConfig
from desctune.data.tokenize import TOKENIZE_FIELDS, tokenize_splits
from desctune.results import BaseModelResult, SampleResult, TokenizeResult
from desctune.stages import code_version, stage_folder
from desctune.store import localize, publish
from tasks.stage import STAGE_CACHE

CODE = code_version("tokenize")


@task(name="tokenize", cache_policy=STAGE_CACHE, persist_result=True, result_serializer="json")
def tokenize(splits: SampleResult, base: BaseModelResult, model: ModelConfig, artifacts_dir: str, code: str = CODE
             ) -> TokenizeResult:
    """Tokenize train and val with the base model's chat template; writes tokens_{train,val}.parquet."""
    out_dir = stage_folder(artifacts_dir, "tokenize", splits.train.sha256, splits.val.sha256, base.sha256,
                           model.subset(TOKENIZE_FIELDS))
    splits, base = localize(artifacts_dir, (splits, base))
    result = tokenize_splits(splits.core(), base.core(), model, out_dir)
    return publish(artifacts_dir, out_dir, TokenizeResult.from_core(result))
