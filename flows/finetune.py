"""The finetune flow: ingest -> clean -> sample -> tokenize -> train -> evaluate -> register. It only composes.

With `eval.test_path` set, that file is ingested and cleaned for scoring and evaluated on instead of the test split."""

from __future__ import annotations

from prefect import flow

from desctune.config import Config
from desctune.registry.lineage import fail_run
from desctune.results import FinetuneResult, RunStages, ScoredSet, scored_records
from desctune.tracking import tracking_uri
from tasks.base_model import base_model
from tasks.clean import clean
from tasks.evaluate import evaluate, report
from tasks.ingest import fingerprint, ingest
from tasks.register import register, start_tracking
from tasks.sample import sample
from tasks.tokenize import tokenize
from tasks.train import train
from tasks.watchdog import exit_with_worker


def _mark_failed(flow, flow_run, state) -> None:
    config = flow_run.parameters.get("config")
    fail_run(Config.model_validate(config or {}), str(flow_run.id))


@flow(name="finetune", log_prints=True, on_failure=[_mark_failed], on_crashed=[_mark_failed])
def finetune(config: Config = Config()) -> FinetuneResult:
    """Fine-tune the base model on product titles -> descriptions and register the adapter in MLflow."""
    exit_with_worker()
    cfg = config
    run_id = start_tracking(cfg)
    raw = ingest(cfg.data, cfg.artifacts_dir, fingerprint(cfg.data.path))
    cleaned = clean(raw, cfg.data, cfg.artifacts_dir)
    splits = sample(cleaned, cfg.data, cfg.artifacts_dir)
    scored = None
    if cfg.eval.test_path:  # read before the base model and training, so a bad file fails the run early
        held_out = cfg.data.for_scoring(cfg.eval.test_path)
        held_raw = ingest(held_out, cfg.artifacts_dir, fingerprint(held_out.path))
        scored = ScoredSet(ingest=held_raw, clean=clean(held_raw, held_out, cfg.artifacts_dir))
    base = base_model(cfg.model.name, cfg.artifacts_dir)
    tokens = tokenize(splits, base, cfg.model, cfg.artifacts_dir)
    trained = train(tokens, base, cfg.model, cfg.lora, cfg.train, cfg.artifacts_dir, run_id, tracking_uri(cfg))
    evaluated = evaluate(trained, scored_records(splits, scored), cfg.eval, cfg.artifacts_dir)
    report(evaluated, cfg.artifacts_dir)
    stages = RunStages(ingest=raw, clean=cleaned, sample=splits, base=base, tokenize=tokens, train=trained,
                       evaluate=evaluated, scored=scored)
    return FinetuneResult(**dict(stages), registered=register(cfg, run_id, stages))
