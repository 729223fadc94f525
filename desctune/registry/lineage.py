"""MLflow lineage of a flow run: its run (config as params, datasets with digests, metrics, reports), the training
metrics stream, the run of a standalone evaluation, and marking the run of a dead flow run FAILED.

Each run records the process that writes it (`desctune.host`, `desctune.pid`, `desctune.process_start`), so a run
left RUNNING by a process killed with SIGKILL, or by a machine that died, can be told from one still being written:
`fail_orphaned_runs` marks it FAILED when that process is gone from this machine or, for a run from another machine,
when its orchestrator says the flow run ended.

The orchestrator's own identifiers (Prefect's flow run id, name and URL) come in as `lineage` tags: this module never
imports Prefect.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Param

from desctune.config import Config, config_to_yaml
from desctune.evaluation.evaluate import MODELS
from desctune.registry.links import md_link
from desctune.results import CleanResult, EvaluateResult, IngestResult, RunStages
from desctune.tracking import client, experiment_id, hide_password, public_config, run_url


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested sections as `section/key`, lists kept whole: the names and values MLflow itself gives the registered
    model's model_config when it logs it into the same run, so each param is there once."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except Exception:
        return "unknown"


# Orchestrator states after which a flow run writes nothing more (Prefect's final state types).
FINAL_FLOW_RUN_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
FLOW_RUN_TAG = "prefect.flow_run_id"


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None where there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """When a process started, in clock ticks since boot (Linux /proc), to tell it from a later one with its pid."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None


def process_tags() -> dict:
    """The tags that name the process writing a run."""
    pid = os.getpid()
    return {"desctune.host": socket.gethostname(), "desctune.pid": str(pid),
            "desctune.process_start": process_start(pid) or ""}


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this machine still runs, and is the one that started at `start` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (not start or stat[19] == start)  # a zombie has ended; another start is another process


def orphan_reason(tags: dict, flow_run_state: str | None, host: str,
                  alive: Callable[[int, str | None], bool] = process_alive) -> str | None:
    """Why a RUNNING run can never finish, or None when it may still be running. A run written on this machine is
    judged by its process alone (gone: orphaned; alive: running, whatever the orchestrator says); a run from another
    machine, or without process tags, by its flow run's state (`flow_run_state`, None when unknown)."""
    pid = tags.get("desctune.pid", "")
    if tags.get("desctune.host") == host and pid.isdigit():
        if alive(int(pid), tags.get("desctune.process_start") or None):
            return None
        return f"its process (pid {pid} on {host}) is gone"
    if flow_run_state in FINAL_FLOW_RUN_STATES:
        return f"its flow run {tags.get(FLOW_RUN_TAG)} ended {flow_run_state}"
    return None


def fail_orphaned_runs(tracking_uri: str, flow_run_states: Callable[[list[str]], dict[str, str]]
                       ) -> list[tuple[str, str]]:
    """Mark FAILED every RUNNING desctune run of the store (any experiment) that can never finish (`orphan_reason`),
    with the reason in its `desctune.failed_because` tag. `flow_run_states(ids)` maps flow run ids to their state
    types (ids it cannot find left out). Returns (run id, reason) of each run marked."""
    c = client(tracking_uri)
    experiments = [e.experiment_id for e in c.search_experiments()]
    if not experiments:
        return []
    runs = [r for r in c.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=50000)
            if FLOW_RUN_TAG in r.data.tags or "desctune.pid" in r.data.tags]
    ids = sorted({r.data.tags[FLOW_RUN_TAG] for r in runs if r.data.tags.get(FLOW_RUN_TAG)})
    states = flow_run_states(ids) if ids else {}
    host, failed = socket.gethostname(), []
    for run in runs:
        why = orphan_reason(run.data.tags, states.get(run.data.tags.get(FLOW_RUN_TAG, "")), host)
        if why is not None:
            c.set_tag(run.info.run_id, "desctune.failed_because", why)
            c.set_terminated(run.info.run_id, "FAILED")
            failed.append((run.info.run_id, why))
    return failed


def flow_run_link(lineage: dict | None) -> str | None:
    """The orchestrator's run as a Markdown link ("[Prefect flow run NAME](URL)"), None without one."""
    lineage = lineage or {}
    if not lineage.get("prefect.flow_run_url"):
        return None
    name = lineage.get("prefect.flow_run_name") or lineage.get("prefect.flow_run_id")
    return md_link(f"Prefect flow run {name}", lineage["prefect.flow_run_url"])


def source_tags(lineage: dict | None, what: str) -> dict:
    """MLflow's Source and description of a run: the orchestrator's run when there is one (its UI link, as a
    Markdown link in the description), else the command line that made it; `what` says in words what the run does."""
    lineage = lineage or {}
    commit = git_commit()
    if lineage.get("prefect.flow_run_url"):
        source, kind = lineage["prefect.flow_run_url"], "JOB"
        made_by = flow_run_link(lineage)
    else:
        source, kind = hide_password(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))[:500] or "python", "LOCAL"
        made_by = f"the command `{source}`"
    tags = {"mlflow.source.name": source, "mlflow.source.type": kind,
            "mlflow.note.content": f"{what}. Made by {made_by}."}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_summary(cfg: Config) -> str:
    return (f"LoRA fine-tuning of {cfg.model.name} (r={cfg.lora.r}, alpha={cfg.lora.alpha}) to write product "
            f"descriptions from product titles, on {cfg.data.path}; base and fine-tuned model evaluated on "
            f"{cfg.eval.test_path or 'the test split'} (BLEU and chrF++ 0-100, ROUGE-L 0-1)")


def start_run(cfg: Config, lineage: dict | None = None) -> str:
    """Create the MLflow run of one flow run: the config as params (the tracking URI without its password),
    `lineage` (the orchestrator's run) and the process writing it as tags, its source and description filled."""
    c = client(cfg)
    shown = public_config(cfg)
    tags = {"desctune.config_hash": cfg.digest(), "desctune.git_commit": git_commit(), **process_tags(),
            **(lineage or {}), **source_tags(lineage, run_summary(cfg))}
    run = c.create_run(experiment_id(cfg), tags=tags, run_name=tags.get("prefect.flow_run_name") or None)
    params = [Param(key, str(value)[:6000]) for key, value in flatten(json.loads(shown.model_dump_json())).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    c.log_text(run.info.run_id, config_to_yaml(shown), "config.yaml")
    return run.info.run_id


class CountedDataset(MetaDataset):
    """A dataset known by source, digest and row count only: for files too big to load just to log them."""

    def __init__(self, source, name: str, digest: str, rows: int):
        self._rows = rows
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return {"num_rows": self._rows}

    def to_dict(self) -> dict:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def log_dataset(run_id: str, name: str, path: str, digest: str, context: str, rows: int | None = None,
                frame: pd.DataFrame | None = None) -> None:
    """mlflow.log_input with the file as source, its content hash as digest, and its row count."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(path).resolve()))
    if frame is not None:
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:16])
    else:
        dataset = CountedDataset(source, name, digest[:16], rows)
    with mlflow.start_run(run_id=run_id, nested=False):
        mlflow.log_input(dataset, context=context)


def stage_figures(stages: RunStages) -> pd.DataFrame:
    """The run's single numbers, one row each (stage, figure, value): records per stage, split sizes and tokens
    (`data`), what training measured once (`train`: mean loss over all steps, throughput, seconds, peak memory) and
    the evaluation's counts (`eval`). MLflow would draw each as a chart of one bar; they go into a table instead."""
    ing, cln, spl, tok, trn = stages.ingest, stages.clean, stages.sample, stages.tokenize, stages.train
    data = {
        "lines_read": ing.lines_read, "records_ingested": ing.records, "records_kept": cln.kept,
        "records_rejected": cln.rejected, "duplicates": cln.duplicates,
        **{f"{s}_rows": getattr(spl, s).rows for s in ("train", "val", "test")},
        "train_examples": tok.train.rows, "train_tokens": tok.train.tokens,
        "train_supervised_tokens": tok.train.supervised_tokens,
        **{f"rejected_{reason}": n for reason, n in cln.by_reason.items()},
    }
    train = {"steps": trn.steps, "loss_mean_all_steps": trn.train_loss_mean, "val_loss": trn.val_loss,
             "overall_tokens_per_s": trn.tokens_per_s, "seconds": trn.seconds, "peak_memory_mb": trn.peak_memory_mb}
    rows = [("data", k, v) for k, v in data.items()] + [("train", k, v) for k, v in train.items()]
    rows += evaluation_figures(stages.evaluate.metrics)
    return pd.DataFrame([r for r in rows if r[2] is not None], columns=["stage", "figure", "value"])


def evaluation_figures(metrics: dict) -> list[tuple[str, str, float]]:
    """An evaluation's counts as (stage, figure, value) rows: examples scored, ROUGE-L wins, losses and ties with
    the sign test, and the share of outputs identical to the base."""
    return [("eval", k, metrics[k]) for k in ("n", "better", "worse", "same", "sign_test_p", "identical_outputs")
            if k in metrics]


def evaluation_metrics(metrics: dict) -> dict:
    """An evaluation's headline numbers as MLflow metrics under `eval/`: each model's BLEU and chrF++ (0-100) and
    ROUGE-L (0-1), and `eval/n`, the examples scored; the demo reads them for a run without version tags. The
    differences with their intervals, invented claims and counts go into the comparison charts and tables
    (`log_comparison`), not into single-bar charts."""
    m = {f"eval/{model}_{key}": metrics[model][key] for model in MODELS for key in ("bleu", "rougeL", "chrf")
         if key in metrics[model]}
    m["eval/n"] = metrics["n"]
    return {k: float(v) for k, v in m.items()}


def log_comparison(c, run_id: str, metrics: dict, figures: pd.DataFrame) -> None:
    """Into the run, once each (a retried task adds nothing): base vs fine-tuned as one chart a metric in MLflow's
    chart grid (`compare/bleu`, `compare/rougeL`, `compare/chrf`, `compare/claims`), the comparison as the table
    `report/comparison.json` and the run's single numbers as the table `report/figures.json`."""
    from desctune.evaluation.evaluate import comparison_images, comparison_table

    logged = {a.path for a in c.list_artifacts(run_id, "report")}
    for name, table in (("comparison", comparison_table(metrics)), ("figures", figures)):
        if f"report/{name}.json" not in logged:
            c.log_table(run_id, table, f"report/{name}.json")
    images = [a.path for a in c.list_artifacts(run_id, "images")]
    for key, image in comparison_images(metrics).items():
        if not any(path.startswith(f"images/compare~{key}+") for path in images):
            c.log_image(run_id, image, key=f"compare/{key}")


def log_results(cfg: Config, run_id: str, stages: RunStages) -> None:
    """Metrics, lineage and report files of one flow run, into its MLflow run. Metrics are the step-indexed training
    series (from training itself, or, when training was reused from an earlier run, copied here at their steps), the
    validation loss at the last step, and the evaluation's headline scores; every other number is in a table."""
    c = client(cfg)
    trained, evaluated = stages.train, stages.evaluate
    for key, value in evaluation_metrics(evaluated.metrics).items():
        c.log_metric(run_id, key, value)
    if trained.mlflow_run_id != run_id:
        for row in trained.history:
            for k, v in row.items():
                if k != "step":
                    c.log_metric(run_id, f"train/{k}", v, step=row["step"])
        c.log_metric(run_id, "train/val_loss", trained.val_loss, step=trained.steps)
    log_comparison(c, run_id, evaluated.metrics, stage_figures(stages))
    ing, cln, spl = stages.ingest, stages.clean, stages.sample
    log_dataset(run_id, "raw", ing.input_path, ing.input_sha256, "raw", rows=ing.records)
    log_dataset(run_id, "clean", cln.clean.path, cln.clean.sha256, "clean", rows=cln.kept)
    for name, split in (("train", spl.train), ("test", stages.test())):
        log_dataset(run_id, name, split.path, split.sha256, name, frame=pd.read_parquet(split.path))
    if stages.scored is not None:
        held = stages.scored.ingest
        log_dataset(run_id, "test-raw", held.input_path, held.input_sha256, "test-raw", rows=held.records)
    reports = (evaluated.plot, evaluated.table, evaluated.report, evaluated.metrics_file)
    for file in (trained.loss_plot, *reports, cln.rejects):
        if file is not None and Path(file.path).is_file():
            c.log_artifact(run_id, file.path, artifact_path="report")
    c.set_tag(run_id, "desctune.base_model", stages.base.name)
    c.set_tag(run_id, "desctune.base_model_sha256", stages.base.sha256)


def fail_run(cfg: Config, flow_run_id: str) -> None:
    """Mark the MLflow run of a failed or crashed flow run as FAILED (the flow's state hooks call it)."""
    c = client(cfg)
    runs = c.search_runs([experiment_id(cfg)], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    for run in runs:
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "FAILED")


def log_evaluation(
    cfg: Config, model: dict, raw: IngestResult, cleaned: CleanResult, result: EvaluateResult,
    lineage: dict | None = None,
) -> dict:
    """An MLflow run of its own for one evaluation of a model version: metrics, datasets, report, version tags."""
    c = client(cfg)
    label = model["label"]
    tags = {"desctune.model_version": label, "desctune.model_ref": model["ref"], "desctune.kind": "evaluation",
            "desctune.data_path": raw.input_path, "desctune.data_sha256": raw.input_sha256, **process_tags(),
            **(lineage or {}),
            **source_tags(lineage, f"Evaluation of {label} against its base model on {raw.input_path} (BLEU and "
                                   "chrF++ 0-100, ROUGE-L 0-1)")}
    if model["version"]:  # which version it evaluated, whatever aliases the label named then
        tags.update({"desctune.registered_model": model["name"], "desctune.registered_version": str(model["version"])})
    run_id = c.create_run(experiment_id(cfg), tags=tags, run_name=f"evaluate {label}").info.run_id
    try:
        metrics = result.metrics
        for key, value in evaluation_metrics(metrics).items():
            c.log_metric(run_id, key, value)
        log_comparison(c, run_id, metrics, pd.DataFrame(evaluation_figures(metrics),
                                                        columns=["stage", "figure", "value"]))
        log_dataset(run_id, "eval-raw", raw.input_path, raw.input_sha256, "evaluation-raw", rows=raw.records)
        log_dataset(run_id, "eval", cleaned.clean.path, cleaned.clean.sha256, "evaluation", rows=cleaned.kept)
        for file in (result.plot, result.table, result.report, result.metrics_file):
            c.log_artifact(run_id, file.path, artifact_path="report")
        if model["version"]:
            c.set_model_version_tag(model["name"], model["version"], "last_evaluation_run", run_id)
    except Exception:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "run_url": run_url(cfg, run_id), "model": label, "metrics": result.metrics}
