"""The summary a finetune run prints at the end."""

from __future__ import annotations

from desctune import localui
from desctune.evaluation.evaluate import significance_lines
from desctune.results import FinetuneResult
from desctune.tracking import hide_password


def prefect_ui_link(flow_run_id: str) -> tuple[str, bool]:
    """This flow run's page in the Prefect UI, and whether that UI is `desctune ui`'s (the run's own server was a
    temporary one) rather than a served one's."""
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return f"{(ui or localui.url('prefect')).rstrip('/')}/runs/flow-run/{flow_run_id}", not ui


def scored_on(result: FinetuneResult) -> str:
    """Which records the run was scored on: its test split, or the held-out file `eval.test_path` named."""
    n = result.evaluate.metrics["n"]
    if result.scored is None:
        return f"{n} test examples (the run's test split)"
    return f"{n} held-out examples ({result.scored.ingest.input_path})"


def summary_text(result: FinetuneResult, flow_run_id: str, ui_command: str = ".venv/bin/desctune ui") -> str:
    """What `desctune run` prints at its end. `ui_command` starts the UIs that show a run recorded locally."""
    ing, cln, spl, trn, ev = result.ingest, result.clean, result.sample, result.train, result.evaluate
    reg = result.registered
    m = ev.metrics
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(cln.by_reason.items())) or "none"
    prefect_link, local_prefect = prefect_ui_link(flow_run_id)
    local = local_prefect or not reg.tracking_uri.startswith("http")
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
        f"store      {hide_password(reg.tracking_uri)}",
        f"adapter    {trn.adapter.path}",
        f"report     {ev.table.path}  {ev.plot.path}",
        "",
        f"See this run{f' (`{ui_command}` starts both UIs on this run; Ctrl-C stops them)' if local else ''}:",
        f"  Prefect UI:  {prefect_link}",
        f"  MLflow UI:   {reg.run_url}",
    ]
    return "\n".join(lines)
