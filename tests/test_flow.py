"""The whole finetune flow on ~40 real records with the tiny model: a real Prefect run, a real MLflow SQLite store."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client

from conftest import EVAL_DATA, ROOT, SAMPLE, head_records, tiny_config
from desctune.config import config_to_yaml
from desctune.files import file_sha256
from desctune.tracking import tracking_uri
from flows.finetune import finetune

CACHED_STAGES = ("ingest", "clean", "sample", "tokenize", "train")


async def task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("flow")
    records = head_records(SAMPLE, tmp / "records.jsonl", 40)
    cfg = tiny_config(tmp, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15})
    first = finetune(config=cfg, return_state=True)
    second = finetune(config=cfg, return_state=True)
    return cfg, first, second


def test_flow_writes_every_intermediate(two_runs):
    cfg, first, _ = two_runs
    assert first.is_completed()
    out = first.result()
    raw = pd.read_parquet(out.ingest.raw.path)
    assert len(raw) == out.ingest.records == 40
    clean = pd.read_parquet(out.clean.clean.path)
    assert out.clean.kept == len(clean) and len(clean) + out.clean.rejected >= 40 - out.clean.duplicates
    assert not clean["content"].str.contains("&#|&amp;|<br", regex=True).any()
    sizes = [split.rows for split in (out.sample.train, out.sample.val, out.sample.test)]
    assert sum(sizes) == len(clean) and min(sizes) > 0
    tokens = pq.read_table(out.tokenize.train.path)
    assert {"input_ids", "labels"} <= set(tokens.column_names)
    assert (Path(out.train.adapter.path) / "adapter_model.safetensors").exists()
    ev = pd.read_parquet(out.evaluate.table.path)
    assert {"title", "reference", "base_output", "finetuned_output", "delta_rougeL"} <= set(ev.columns)
    assert len(ev) == min(cfg.eval.limit, out.sample.test.rows)


def test_flow_registers_a_version_with_metrics_and_aliases(two_runs, tmp_path):
    cfg, first, second = two_runs
    client = MlflowClient(tracking_uri(cfg))
    reg = first.result().registered
    version = client.get_model_version(cfg.registry.model_name, reg.version)
    run = client.get_run(version.run_id)
    headline = {f"eval/{m}_{k}" for m in ("base", "finetuned") for k in ("bleu", "rougeL", "chrf")}
    headline |= {"eval/n", "train/val_loss"}
    series = {"train/loss", "train/learning_rate", "train/tokens_per_s", "train/supervised_tokens_per_s"}
    # metrics are the training series and the few headline numbers, each logged once; no other single number is
    # a metric (MLflow would chart it as one bar)
    assert set(run.data.metrics) == headline | series
    last = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    [val] = client.get_metric_history(run.info.run_id, "train/val_loss")
    assert val.step == last > 0
    for key in headline:
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    assert run.data.metrics["eval/n"] == first.result().evaluate.metrics["n"]
    tables = {name: pd.read_json(client.download_artifacts(run.info.run_id, f"report/{name}.json", str(tmp_path)),
                                 orient="split") for name in ("figures", "comparison")}
    figures = tables["figures"].set_index(["stage", "figure"])["value"]
    assert figures["data", "records_kept"] == first.result().clean.kept and figures["train", "peak_memory_mb"] > 0
    assert list(tables["comparison"]["base"][:3]) == pytest.approx(
        [run.data.metrics[f"eval/base_{k}"] for k in ("bleu", "rougeL", "chrf")])
    images = {a.path.split("/", 1)[1].split("+", 1)[0] for a in client.list_artifacts(run.info.run_id, "images")}
    assert images == {"compare~bleu", "compare~rougeL", "compare~chrf", "compare~claims"}
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == str(first.state_details.flow_run_id)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"raw", "clean", "train", "test"}
    challenger = client.get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert str(challenger.version) == second.result().registered.version
    assert "challenger" in reg.aliases


def test_second_identical_run_takes_ingest_to_train_from_cache(two_runs):
    _, first, second = two_runs
    states_first = asyncio.run(task_states(first.state_details.flow_run_id))
    states_second = asyncio.run(task_states(second.state_details.flow_run_id))
    assert all(states_first[s] == "Completed" for s in CACHED_STAGES)
    assert {s: states_second[s] for s in CACHED_STAGES} == {s: "Cached" for s in CACHED_STAGES}
    assert states_second["evaluate"] == "Cached" and states_second["register"] == "Completed"
    assert first.result().train.adapter.sha256 == second.result().train.adapter.sha256
    registered = second.result().registered
    assert registered.unchanged and registered.version == first.result().registered.version


async def stage_states(flow_run_id) -> dict[str, list[str]]:
    """Each stage's task run states in one flow run (a stage can run more than once: ingest and clean of the scored
    file)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for r in runs:
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return states


def test_a_run_with_eval_test_path_is_scored_and_registered_on_that_file(tmp_path, tiny_model_dir):
    from app.summary import summary_text

    records = head_records(SAMPLE, tmp_path / "records.jsonl", 40)
    held_out = head_records(EVAL_DATA, tmp_path / "held_out.jsonl", 12)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15},
                      eval={"limit": 8, "test_path": str(held_out)})
    first = finetune(config=cfg, return_state=True)
    out = first.result()
    scored = pd.read_parquet(out.scored.clean.clean.path)
    assert out.scored.ingest.input_path == str(held_out) and out.scored.ingest.records == 12
    table = pd.read_parquet(out.evaluate.table.path)
    assert out.evaluate.metrics["n"] == len(table) == 8
    assert table["title"].tolist() == scored["title"].head(8).tolist()
    assert not set(table["title"]) & set(pd.read_parquet(out.sample.test.path)["title"])

    client = MlflowClient(tracking_uri(cfg))
    tags = client.get_model_version(cfg.registry.model_name, out.registered.version).tags
    assert tags["data.test_input"] == str(held_out)
    assert tags["data.test_input_sha256"] == file_sha256(held_out)
    assert tags["data.test_sha256"] == out.scored.clean.clean.sha256 != out.sample.test.sha256
    run = client.get_run(out.registered.run_id)
    test_inputs = {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}
    assert test_inputs["test"] == out.scored.clean.clean.sha256[:16]
    assert test_inputs["test-raw"] == file_sha256(held_out)[:16]
    assert f"evaluation 8 held-out examples ({held_out})" in summary_text(out, str(first.state_details.flow_run_id))

    second = finetune(config=cfg, return_state=True)
    states = asyncio.run(stage_states(second.state_details.flow_run_id))
    assert states["ingest"] == states["clean"] == ["Cached", "Cached"]
    assert {s: states[s] for s in ("sample", "tokenize", "train", "evaluate")} == {
        s: ["Cached"] for s in ("sample", "tokenize", "train", "evaluate")}
    registered = second.result().registered
    assert registered.unchanged and registered.version == out.registered.version


def test_a_changed_setting_reruns_only_the_stages_after_it(two_runs):
    cfg, first, _ = two_runs
    eval_only = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_new_tokens": 5})})
    lora_only = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"r": 2})})
    for changed, rerun in ((eval_only, {"evaluate"}), (lora_only, {"train", "evaluate"})):
        state = finetune(config=changed, return_state=True)
        states = asyncio.run(task_states(state.state_details.flow_run_id))
        assert {s for s in (*CACHED_STAGES, "evaluate") if states[s] != "Cached"} == rerun
        assert states["register"] == "Completed" and not state.result().registered.unchanged


def test_cached_stage_results_are_stored_as_json_not_pickle(two_runs):
    """A stage's cached result is read back on the next run: stored as JSON (a result model's fields, named by its
    class in desctune.results), not as a pickle whose reading could run any code."""
    records = [json.loads(p.read_bytes()) for p in Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]).iterdir()
               if p.is_file()]
    assert len(records) >= len(CACHED_STAGES) + 1
    assert {r["metadata"]["serializer"]["type"] for r in records} == {"json"}
    results = [json.loads(r["result"]) for r in records]
    assert all(r["__class__"].startswith("desctune.results.") for r in results)
    # identical trainings elsewhere in the session write identical adapters: this run's is the one at its path
    [trained] = {json.dumps(r["data"]["adapter"]) for r in results if r["__class__"] == "desctune.results.TrainResult"
                 and r["data"]["adapter"]["path"] == two_runs[1].result().train.adapter.path}
    assert set(json.loads(trained)) == {"path", "sha256", "size"}


def test_a_cached_split_rewritten_with_other_contents_is_recomputed_not_trained_on(two_runs, tiny_tokenizer):
    """A cached train.parquet rewritten as valid Parquet with other contents: the rerun that tokenizes again finds it
    is not the file the sample stage wrote, recomputes the split, and the examples are the original records."""
    cfg, first, _ = two_runs
    out = first.result()
    split = Path(out.sample.train.path)
    original = pd.read_parquet(split)
    original.assign(content="ALTERED " + original["content"]).to_parquet(split)
    shutil.rmtree(Path(out.tokenize.train.path).parent)

    state = finetune(config=cfg, return_state=True)
    states = asyncio.run(task_states(state.state_details.flow_run_id))
    assert {s: states[s] for s in CACHED_STAGES} == {"ingest": "Cached", "clean": "Cached", "sample": "Completed",
                                                     "tokenize": "Completed", "train": "Cached"}
    assert pd.read_parquet(split).equals(original) and file_sha256(split) == out.sample.train.sha256
    again = state.result().tokenize.train
    assert again.sha256 == out.tokenize.train.sha256
    texts = [tiny_tokenizer.decode(ids) for ids in pq.read_table(again.path).column("input_ids").to_pylist()]
    assert not any("ALTERED" in t for t in texts)


def test_a_flipped_byte_in_a_cached_split_is_one_line_and_the_run_recovers(two_runs, tmp_path):
    """`desctune run` after a byte of a cached val.parquet flipped, with the tokens to compute again: one line names
    the file and the stage it recomputes, no traceback, exit 0."""
    cfg, first, _ = two_runs
    out = first.result()
    split = Path(out.sample.val.path)
    damaged = bytearray(split.read_bytes())
    damaged[len(damaged) // 3] ^= 0xFF
    split.write_bytes(bytes(damaged))
    shutil.rmtree(Path(out.tokenize.val.path).parent)
    (tmp_path / "profile.yaml").write_text(config_to_yaml(cfg))

    home = tmp_path / "prefect"  # a Prefect database of its own; the stage cache is the one of the runs above
    env = {**os.environ, "PREFECT_HOME": str(home),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "run", "--config", str(tmp_path / "profile.yaml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in printed, printed[-4000:]
    [line] = [ln for ln in printed.splitlines() if "changed since it was written" in ln]
    assert str(split) in line and line.endswith("recomputing sample"), line
    assert file_sha256(split) == out.sample.val.sha256
