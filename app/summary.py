"""The summary a finetune run prints at the end."""

from __future__ import annotations

from desctune.evaluation.evaluate import significance_lines
from desctune.results import FinetuneResult
from desctune.tracking import LOCAL_MLFLOW_UI


def prefect_ui_hint(flow_run_id: str) -> str:
    """The served UI's link to this flow run, or how to start a UI on the local database that recorded it."""
    from prefect.settings import PREFECT_UI_URL

    from tasks.stage import LOCAL_PREFECT_UI

    ui = PREFECT_UI_URL.value()
    if ui:
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
    return f".venv/bin/prefect server start   then {LOCAL_PREFECT_UI}/runs/flow-run/{flow_run_id}"


def scored_on(result: FinetuneResult) -> str:
    """Which records the run was scored on: its test split, or the held-out file `eval.test_path` named."""
    n = result.evaluate.metrics["n"]
    if result.scored is None:
        return f"{n} test examples (the run's test split)"
    return f"{n} held-out examples ({result.scored.ingest.input_path})"


def summary_text(result: FinetuneResult, flow_run_id: str) -> str:
    ing, cln, spl, trn, ev = result.ingest, result.clean, result.sample, result.train, result.evaluate
    reg = result.registered
    m = ev.metrics
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(cln.by_reason.items())) or "none"
    uri = reg.tracking_uri
    mlflow_ui = reg.run_url if uri.startswith("http") else (
        f".venv/bin/mlflow ui --backend-store-uri {uri} --port {LOCAL_MLFLOW_UI.rsplit(':', 1)[1]}"
        f"   then {reg.run_url}"
    )
    lines = [
        "",
        "desctune run summary",
        "--------------------",
        f"records    read {ing.lines_read}, kept {cln.kept}, rejected {cln.rejected} ({reasons})",
        f"splits     train {spl.train.rows}, val {spl.val.rows}, test {spl.test.rows}",
        f"training   loss {trn.train_loss_first:.3f} -> {trn.train_loss_last:.3f} over {trn.steps} steps, "
        f"val loss {trn.val_loss:.3f}, {trn.tokens_per_s:.0f} tokens/s on {trn.device} ({trn.dtype})",
        f"plan       {trn.plan.get('reason', 'not recorded (trained before plans were explained)')}",
        f"evaluation {scored_on(result)}",
        f"{'':31}BLEU      ROUGE-L   chrF++   length",
        *(f"           {label:20}{m[k]['bleu']:8.2f}  {m[k]['rougeL']:9.4f}  {m[k]['chrf']:7.2f}  "
          f"{m[k]['length_ratio']:6.2f}"
          for k, label in (("base", "base"), ("finetuned", "fine-tuned"))),
        *(f"           {line}" for line in significance_lines(m)),
        f"           better {m['better']}, worse {m['worse']}, same {m['same']} (by ROUGE-L, sign test p = "
        f"{m['sign_test_p']:.3g}); length = median output / reference characters",
        f"registry   {reg.name} version {reg.version}, aliases: {', '.join(reg.aliases) or 'none'}",
        f"           {reg.decision}",
        f"adapter    {trn.adapter.path}",
        f"report     {ev.table.path}  {ev.plot.path}",
        "",
        "See this run:",
        f"  Prefect UI:  {prefect_ui_hint(flow_run_id)}",
        f"  MLflow UI:   {mlflow_ui}",
    ]
    return "\n".join(lines)
