"""The demo's logic without Streamlit: which models there are, their evaluation report and metrics, the adapter
checks, one side-by-side generation and its token stream. `app/demo_page.py` only lays these out."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from desctune.config import Config, EvalConfig, load_config

CONFIG_ENV, MODEL_ENV, HOST_ENV = "DESCTUNE_DEMO_CONFIG", "DESCTUNE_DEMO_MODEL", "DESCTUNE_DEMO_HOST"
GENERATING = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """Generation settings from the sidebar; greedy unless `sample` is set."""

    max_new_tokens: int = 128
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    repetition_penalty: float = EvalConfig().repetition_penalty
    no_repeat_ngram_size: int = EvalConfig().no_repeat_ngram_size


def demo_config() -> tuple[Config, str]:
    """The config (`desctune demo --config`) and the starting model reference (`--model`, else @champion)."""
    cfg = load_config(os.environ.get(CONFIG_ENV) or None)
    ref = os.environ.get(MODEL_ENV) or f"models:/{cfg.registry.model_name}@champion"
    return cfg, ref


def no_champion_fallback(ref: str, tracking_uri: str, name: str) -> tuple[str, str | None]:
    """The page's first model: `ref`, except that the default @champion, when no version has become champion yet
    (the registry's gate kept each as challenger), gives way to @challenger with a note saying why."""
    from mlflow.exceptions import MlflowException

    from desctune.tracking import client

    if ref != f"models:/{name}@champion":
        return ref, None
    c = client(tracking_uri)
    try:
        aliases = c.get_registered_model(name).aliases
        challenger = c.get_model_version_by_alias(name, "challenger") if "challenger" in aliases else None
    except MlflowException:
        return ref, None
    if "champion" in aliases or challenger is None:
        return ref, None
    why = challenger.tags.get("champion_gate", "the registry's gate has not promoted any version")
    return (f"models:/{name}@challenger",
            f"No version of {name} is champion yet, so this page shows @challenger (version {challenger.version}): "
            f"{why}.")


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a model version: the MLflow run holding it, the examples it scored (`n`, None when not
    recorded) and on what (`where`, in words), its figures as the version tags the panel reads (`metric.*`) and the
    run's metrics; `own` for the run that registered the version."""

    run_id: str
    n: int | None
    where: str
    tags: dict
    metrics: dict
    own: bool
    started: int = 0

    def scored_on(self, link: str, count: int) -> str:
        """What the panel says it shows: "Scored on 200 examples of the file data/eval.jsonl, by evaluation run
        LINK (the largest of the 2 evaluations of this version)."."""
        size = f"{self.n} examples" if self.n is not None else "an unrecorded number of examples"
        by = "the run that registered this version" if self.own else "evaluation run"
        largest = f" (the largest of the {count} evaluations of this version)" if count > 1 else ""
        return f"Scored on {size} of {self.where}, by {by} {link}{largest}."


def examples_scored(tags: dict, run_metrics: dict) -> int | None:
    """How many examples an evaluation scored: the version's `metric.n`, else the run's `eval/n`, else its ROUGE-L
    wins, losses and ties added up (runs logged before either); None when none is recorded."""
    if tags.get("metric.n"):
        return int(tags["metric.n"])
    if run_metrics.get("eval/n") is not None:
        return int(run_metrics["eval/n"])
    counts = [run_metrics.get(f"eval/{k}") for k in ("better", "worse", "same")]
    return None if any(c is None for c in counts) else int(sum(counts))


def own_evaluation(tags: dict, run_id: str, run_metrics: dict) -> Evaluation:
    """The evaluation the version was registered with: on the held-out file `eval.test_path` named, or on the
    run's test split."""
    where = f"the held-out file {tags['data.test_input']}" if tags.get("data.test_input") else "the run's test split"
    return Evaluation(run_id, examples_scored(tags, run_metrics), where, tags, run_metrics, own=True)


def evaluation_runs(tracking_uri: str, name: str, version: str) -> list[Evaluation]:
    """The finished evaluation runs of `name` version `version` (evaluate-champion's, tagged with the version),
    their figures not yet loaded (`with_figures`)."""
    import re

    from desctune.tracking import client

    c = client(tracking_uri)
    experiments = [e.experiment_id for e in c.search_experiments()]
    if not experiments:
        return []
    runs = c.search_runs(experiments, "tags.`desctune.kind` = 'evaluation' and attributes.status = 'FINISHED'",
                         max_results=1000)
    label = re.compile(rf"{re.escape(name)} version {re.escape(str(version))}(?: \(|$)")  # runs tagged before
    found = []
    for r in runs:
        t = r.data.tags
        if (t.get("desctune.registered_model"), t.get("desctune.registered_version")) == (name, str(version)) or (
                "desctune.registered_version" not in t and label.match(t.get("desctune.model_version", ""))):
            found.append(Evaluation(r.info.run_id, examples_scored({}, r.data.metrics),
                                    f"the file {t.get('desctune.data_path', '(not recorded)')}", {}, r.data.metrics,
                                    own=False, started=r.info.start_time or 0))
    return found


def with_figures(tracking_uri: str, evaluation: Evaluation) -> Evaluation:
    """An evaluation run's figures as version tags, from its `report/metrics.json` (else its `eval/` metrics)."""
    import dataclasses

    import mlflow

    from desctune.registry.register import metric_tags

    try:
        path = mlflow.artifacts.download_artifacts(run_id=evaluation.run_id, artifact_path="report/metrics.json",
                                                   tracking_uri=tracking_uri)
        tags = metric_tags(json.loads(Path(path).read_text()))
    except Exception:  # an unreadable report: the scores the run logged as metrics still show
        tags = {f"metric.{k.removeprefix('eval/')}": str(v) for k, v in evaluation.metrics.items()}
    return dataclasses.replace(evaluation, tags=tags)


def best_evaluation(tracking_uri: str, name: str | None, version: str | None, tags: dict, run_id: str | None,
                    run_metrics: dict) -> tuple[Evaluation | None, int]:
    """The most trustworthy evaluation the registry has of a version, the one that scored the most examples (on a
    tie the newest evaluation run), with how many there are: the one it was registered with and each evaluation
    run tagged with it. (None, 0) for an adapter that is not in the registry."""
    if run_id is None or version is None:
        return None, 0
    found = [own_evaluation(tags, run_id, run_metrics), *evaluation_runs(tracking_uri, name, version)]
    best = max(found, key=lambda e: (e.n if e.n is not None else -1, not e.own, e.started))
    return (best if best.own else with_figures(tracking_uri, best)), len(found)


def run_link(cfg, tracking_uri: str, run_id: str) -> str:
    """The MLflow run as a markdown link to its page in the MLflow UI (model-training view)."""
    from desctune.tracking import TRAINING_VIEW, client, ui_base

    experiment = client(tracking_uri).get_run(run_id).info.experiment_id
    return f"[`{run_id}`]({ui_base(cfg)}/#/experiments/{experiment}/runs/{run_id}?{TRAINING_VIEW})"


def shared() -> bool:
    """Whether the page is served beyond this machine (`desctune demo --host` not loopback)."""
    from app.serve_auth import is_loopback

    return not is_loopback(os.environ.get(HOST_ENV) or "127.0.0.1")


def refused_ref(ref: str, shared: bool) -> str | None:
    """Why the sidebar may not load `ref`, None when it may: a shared page loads registry references only, never a
    folder on the server."""
    from desctune.registry.modelref import REF

    if not shared or not ref or REF.match(ref.strip()):
        return None
    return ("This demo is served beyond its machine, so it loads registry references only "
            "(models:/NAME@ALIAS or models:/NAME/VERSION), not folders on the server.")


def model_choices(tracking_uri: str, name: str) -> list[str]:
    """References the registry offers for `name`: each alias, then each version, newest first."""
    from mlflow.exceptions import MlflowException

    from desctune.tracking import client

    c = client(tracking_uri)
    try:
        model = c.get_registered_model(name)
    except MlflowException:
        return []
    versions = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")), reverse=True)
    return [f"models:/{name}@{a}" for a in sorted(model.aliases)] + [f"models:/{name}/{v}" for v in versions]


def report_path(tracking_uri: str, run_id: str, artifacts_dir: str | Path) -> Path | None:
    """The run's `report/eval.parquet`, downloaded once under the artifacts folder (None when the run has none)."""
    import mlflow

    dest = Path(artifacts_dir) / "registry" / "runs" / run_id
    path = dest / "eval.parquet"
    if not path.is_file():
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report/eval.parquet", dst_path=str(dest),
                                                tracking_uri=tracking_uri)
        except Exception:
            return None
    return path if path.is_file() else None


def test_split_path(tracking_uri: str, run_id: str) -> Path | None:
    """The test split Parquet the run recorded as its `test` dataset input, if it is still on disk."""
    from desctune.tracking import client

    for d in client(tracking_uri).get_run(run_id).inputs.dataset_inputs:
        if d.dataset.name == "test":
            try:
                source = json.loads(d.dataset.source)
            except (TypeError, ValueError):
                continue
            path = Path(str(source.get("uri") or source.get("path") or "").removeprefix("file://"))
            if path.is_file():
                return path
    return None


def examples(tracking_uri: str, run_id: str | None, artifacts_dir: str | Path) -> pd.DataFrame:
    """Test-split titles with their reference descriptions (and the evaluation's outputs when the report has them)."""
    if run_id is None:
        return pd.DataFrame(columns=["title", "reference"])
    path = report_path(tracking_uri, run_id, artifacts_dir)
    if path is not None:
        return pd.read_parquet(path)
    split = test_split_path(tracking_uri, run_id)
    if split is None:
        return pd.DataFrame(columns=["title", "reference"])
    return pd.read_parquet(split, columns=["title", "content"]).rename(columns={"content": "reference"})


def metrics_frame(tags: dict, run_metrics: dict | None = None) -> pd.DataFrame | None:
    """BLEU, ROUGE-L (and chrF++ where recorded) of base and fine-tuned, from the version's `metric.*` tags (else the
    run's metrics)."""
    rows = {}
    for model, label in (("base", "base"), ("finetuned", "fine-tuned")):
        row = {}
        for key, col in (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("chrf", "chrF++")):
            logged = run_metrics or {}
            value = tags.get(f"metric.{model}_{key}", logged.get(f"eval/{model}_{key}", logged.get(f"{model}_{key}")))
            if value is None and key != "chrf":
                return None
            if value is not None:
                row[col] = float(value)
        rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def chart(metrics: pd.DataFrame, column: str) -> tuple[pd.DataFrame, list[str]]:
    """One score as a chart's data (a row, one column per model) and the models' fixed colours in column order."""
    from desctune.evaluation.evaluate import COLORS, LABELS

    frame = metrics[[column]].T
    colors = [COLORS[m] for label in frame.columns for m, name in LABELS.items() if name == label]
    return frame, colors


def significance(tags: dict) -> list[str]:
    """The evaluation's verdicts for people ("fine-tuned better: ROUGE-L +0.0120 [+0.0040, +0.0200], 95% CI"), from
    the version's `metric.delta_*` tags; empty for versions registered without them."""
    from desctune.evaluation.evaluate import METRIC_LABELS
    from desctune.evaluation.significance import describe

    lines = []
    for key, label in METRIC_LABELS.items():
        raw = tags.get(f"metric.delta_{key}")
        if raw:
            lines.append(describe(label, json.loads(raw), 4 if key == "rougeL" else 2))
    return lines


def claims_line(tags: dict) -> str | None:
    """The version's invented-claims rates and their difference ("invented claims: base 7% → fine-tuned 11%, +4 pts
    [-3, +12]"), from its `metric.claims_*` tags; None for versions registered without them."""
    base, tuned, raw = (tags.get(k) for k in ("metric.claims_base", "metric.claims_finetuned", "metric.delta_claims"))
    if base is None or tuned is None or not raw:
        return None
    d = json.loads(raw)
    return (f"invented claims: base {float(base):.0%} → fine-tuned {float(tuned):.0%}, {d['delta'] * 100:+.0f} pts "
            f"[{d['low'] * 100:+.0f}, {d['high'] * 100:+.0f}] ({d.get('verdict', 'not measured')})")


CLAIM_COLORS = {"praise": "#f6c453", "boilerplate": "#c9b3f5", "number": "#9fd8a8", "entity": "#f5a3a3"}


def highlight_claims(text: str, title: str) -> tuple[str, list[str]]:
    """`text` as HTML with each claim its title cannot support marked (the kind in the mark's tooltip and colour),
    and one line a claim ("number: 40 hours") for the caption under it."""
    import html

    from desctune.evaluation.claims import KIND_LABELS, find_claims

    claims = find_claims(text, title)
    parts, at = [], 0
    for c in claims:
        parts.append(html.escape(text[at : c.start]))
        parts.append(f'<mark class="claim claim-{c.kind}" title="{KIND_LABELS[c.kind]}" '
                     f'style="background:{CLAIM_COLORS[c.kind]}">{html.escape(text[c.start : c.end])}</mark>')
        at = c.end
    parts.append(html.escape(text[at:]))
    body = "".join(parts).replace("\n", "<br>")
    return f'<div style="white-space: pre-wrap">{body}</div>', [f"{c.kind}: {c.text.strip()}" for c in claims]


def adapter_problems(status: dict, report: pd.DataFrame | None = None) -> list[str]:
    """Everything that makes the fine-tuned column no different from the base (the evaluation guard's own checks,
    as sentences); empty when the adapter works."""
    from desctune.evaluation.evaluate import adapter_problems as problems_of

    same = None
    if report is not None and len(report) and {"base_output", "finetuned_output"} <= set(report.columns):
        same = float((report["base_output"] == report["finetuned_output"]).mean())
    return [f"{p[0].upper()}{p[1:]}." for p in problems_of(status, same)]


def side_by_side(model, tokenizer, title: str, system_prompt: str, settings: Settings) -> tuple[str, str]:
    """(base, fine-tuned) descriptions of one title from the same weights, the adapter off then on.

    The adapter toggle is state of the one shared model, so sessions generate one at a time.
    """
    import torch

    from desctune.evaluation.generation import base_context, generate

    kwargs = dict(
        batch_size=1, max_new_tokens=settings.max_new_tokens, do_sample=settings.sample,
        temperature=settings.temperature, top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
    )
    with GENERATING:
        torch.manual_seed(settings.seed)
        with base_context(model):
            base = generate(model, tokenizer, [title], system_prompt, **kwargs)[0]
        torch.manual_seed(settings.seed)
        tuned = generate(model, tokenizer, [title], system_prompt, **kwargs)[0]
    return base, tuned


def rate_line(tokens: int, seconds: float, stopped: bool = False) -> str:
    """What the demo shows under an output: tokens, elapsed time and tokens/s."""
    speed = f"{tokens / seconds:.1f} tokens/s" if seconds > 0 else "… tokens/s"
    return f"{tokens} tokens in {seconds:.1f} s · {speed}" + (" · stopped" if stopped else "")


def stream(model, tokenizer, title: str, system_prompt: str, settings: Settings, adapter: bool,
           stop: threading.Event | None = None) -> Iterator[tuple[str, int, float]]:
    """(text so far, tokens generated, seconds) as the model writes, the adapter on or off; the same prompt, decoding
    and seed as `side_by_side`, so the last text is the same description. Setting `stop` (or closing the iterator,
    as a Streamlit rerun does) ends the generation at the next token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    from desctune.evaluation.generation import base_context, context_length, fit_prompts

    stop = stop or threading.Event()

    class Counting(TextIteratorStreamer):
        tokens = 0

        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                self.tokens += int(value.numel())
            super().put(value)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    prompt = fit_prompts(tokenizer, [title], system_prompt, context_length(model) - settings.max_new_tokens)[0]
    device = next(model.parameters()).device
    streamer = Counting(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {"do_sample": settings.sample, "repetition_penalty": settings.repetition_penalty,
              "no_repeat_ngram_size": settings.no_repeat_ngram_size}
    if settings.sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    failed: list[BaseException] = []

    def work() -> None:
        try:
            with GENERATING:
                torch.manual_seed(settings.seed)
                with contextlib.nullcontext() if adapter else base_context(model):
                    model.generate(
                        input_ids=torch.tensor([prompt], device=device),
                        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
                        max_new_tokens=settings.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, use_cache=True, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([Stop()]), **kwargs,
                    )
        except BaseException as exc:  # noqa: BLE001  (handed to the reader, which raises it)
            failed.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, name="demo-generate", daemon=True)
    t0 = time.perf_counter()
    thread.start()
    text = ""
    try:
        for chunk in streamer:
            text += chunk
            yield text.strip(), streamer.tokens, time.perf_counter() - t0
    finally:
        stop.set()
        thread.join()
    if failed:
        raise failed[0]
    yield text.strip(), streamer.tokens, time.perf_counter() - t0
