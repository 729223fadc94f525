"""Evaluate: base vs fine-tuned generations on the test split, scored with corpus BLEU and ROUGE-L.

Both come from one copy of the weights (adapter disabled, then enabled). A guard stops the run before registering
when the adapter is empty, not applied, or changes (almost) nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import sacrebleu
from rouge_score import rouge_scorer

from desctune.config import DataConfig, EvalConfig
from desctune.errors import AdapterError
from desctune.evaluation import claims as cl
from desctune.evaluation import significance as sig
from desctune.evaluation.generation import adapter_status, base_context, generate, load_adapter_model
from desctune.files import atomic_path, start_stage, write_parquet

log = logging.getLogger(__name__)

IDENTICAL_LIMIT = 0.9
MODELS = ("base", "finetuned")
# One colour per model in every chart (the report's PNG, the demo): orange base, blue fine-tuned, apart for
# colour-blind readers too.
COLORS = {"base": "#e07b39", "finetuned": "#2b7bb9"}
LABELS = {"base": "base", "finetuned": "fine-tuned"}


def score(references: list[str], outputs: dict[str, list[str]]) -> tuple[pd.DataFrame, dict]:
    """Per-example sentence BLEU and ROUGE-L F for each model, plus corpus BLEU (0-100) and mean ROUGE-L (0-1)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    df = pd.DataFrame({"reference": references})
    metrics: dict = {"n": len(references)}
    for name in MODELS:
        hyps = outputs[name]
        df[f"{name}_output"] = hyps
        df[f"{name}_bleu"] = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, references)]
        df[f"{name}_rougeL"] = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, references)]
        metrics[name] = {
            "bleu": float(sacrebleu.corpus_bleu(hyps, [references]).score),
            "rougeL": float(df[f"{name}_rougeL"].mean()),
        }
    df["delta_bleu"] = df["finetuned_bleu"] - df["base_bleu"]
    df["delta_rougeL"] = df["finetuned_rougeL"] - df["base_rougeL"]
    eps = 1e-9
    metrics["better"] = int((df["delta_rougeL"] > eps).sum())
    metrics["worse"] = int((df["delta_rougeL"] < -eps).sum())
    metrics["same"] = len(df) - metrics["better"] - metrics["worse"]
    metrics["identical_outputs"] = float((df["base_output"] == df["finetuned_output"]).mean()) if len(df) else 0.0
    metrics.update(compare(df, metrics))
    return df, metrics


def compare(df: pd.DataFrame, metrics: dict) -> dict:
    """chrF++ and length ratios for both models, and for each metric the paired 95% bootstrap interval of
    (fine-tuned - base) with its verdict, plus the sign test of the ROUGE-L wins and losses."""
    refs = df["reference"].tolist()
    out: dict = {"comparison": {}, "resamples": sig.RESAMPLES}
    stats = {}
    for name in MODELS:
        hyps = df[f"{name}_output"].tolist()
        stats[name] = {m: sig.corpus_stats(m, hyps, refs) for m in ("bleu", "chrf")}
        metrics[name]["chrf"] = sig.corpus_score("chrf", stats[name]["chrf"].sum(axis=0)) if len(df) else 0.0
        lengths = sig.length_ratios(hyps, refs)
        metrics[name]["length_ratio"] = lengths["median"]
        metrics[name]["length_ratio_by_reference_chars"] = lengths["buckets"]
        df[f"{name}_length_ratio"] = [len(h) / max(len(r), 1) for h, r in zip(hyps, refs)]
    for m in ("bleu", "chrf"):
        out["comparison"][m] = sig.paired_corpus(m, stats["base"][m], stats["finetuned"][m])
    out["comparison"]["rougeL"] = sig.paired_mean(df["base_rougeL"].tolist(), df["finetuned_rougeL"].tolist())
    for interval in out["comparison"].values():
        interval["verdict"] = sig.verdict(interval)
    out["sign_test_p"] = sig.sign_test(metrics["better"], metrics["worse"])
    return out


METRIC_LABELS = {"rougeL": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF++"}


def significance_lines(metrics: dict) -> list[str]:
    """For people: one line a metric ('fine-tuned better: ROUGE-L +0.0120 [+0.0040, +0.0200], 95% CI'), then the
    invented-claims line where the evaluation measured them."""
    lines = [sig.describe(METRIC_LABELS[m], metrics["comparison"][m], 4 if m == "rougeL" else 2)
             for m in ("rougeL", "bleu", "chrf")]
    if "claims" in metrics:
        lines.append(cl.describe(metrics["claims"]))
    return lines


def score_claims(df: pd.DataFrame, metrics: dict) -> None:
    """The claims each output (and each reference) makes that its title cannot support: per-example columns
    `{base,finetuned,reference}_claims` (JSON lists of {kind, start, end, text}) and `metrics['claims']` (rates per
    model and kind, paired intervals of fine-tuned - base)."""
    outputs = {m: df[f"{m}_output"].tolist() for m in MODELS}
    summary, flags = cl.claim_summary(df["title"].tolist(), outputs, df["reference"].tolist())
    for name, found in flags.items():
        df[f"{name}_claims"] = [json.dumps([asdict(c) for c in claims], ensure_ascii=False) for claims in found]
    metrics["claims"] = summary


def adapter_problems(status: dict, identical_outputs: float | None = None) -> list[str]:
    """Every way the fine-tuned model can silently be its base (the guard refuses them, the demo shows them):
    no LoRA layers, layers disabled, all-zero weights, or outputs that (almost) always equal the base's."""
    problems = []
    if not status["loaded"]:
        problems.append("the adapter was not applied: the model has no LoRA layers, so 'fine-tuned' is the base model")
    elif not status["active"]:
        problems.append(
            "the adapter was not applied: its LoRA layers are disabled, so generations use the base weights"
        )
    elif not status["nonzero"]:
        problems.append("the adapter's LoRA weights are all zero: training changed nothing, so no output can change")
    if identical_outputs is not None and identical_outputs >= IDENTICAL_LIMIT:
        problems.append(
            f"the fine-tuned outputs equal the base outputs on {identical_outputs:.0%} of examples "
            f"(limit {IDENTICAL_LIMIT:.0%}): the adapter has no effect"
        )
    return problems


def guard_adapter(status: dict, identical_outputs: float | None = None) -> None:
    """Refuse a fine-tuned model that cannot differ from its base, or whose outputs (almost) never do."""
    problems = adapter_problems(status, identical_outputs)
    if problems:
        raise AdapterError(problems[0])


# What each comparison chart and table row shows: the key in `metrics`, its title with its scale, its digits.
SCORES = {"bleu": ("corpus BLEU (0-100)", 2), "rougeL": ("ROUGE-L F (0-1)", 4), "chrf": ("chrF++ (0-100)", 2)}
CLAIMS_TITLE = "outputs with an invented claim (share)"


def comparisons(metrics: dict) -> list[dict]:
    """Base against fine-tuned, one entry a metric on one scale: `key`, `title`, `digits`, both `values` and, where
    the evaluation measured it, the paired 95% `interval` of fine-tuned - base; the invented-claims share last."""
    out = [{"key": k, "title": title, "digits": digits, "values": {m: metrics[m][k] for m in MODELS},
            "interval": metrics.get("comparison", {}).get(k)}
           for k, (title, digits) in SCORES.items() if all(k in metrics[m] for m in MODELS)]
    if "claims" in metrics:
        c = metrics["claims"]
        out.append({"key": "claims", "title": CLAIMS_TITLE, "digits": 2,
                    "values": {m: c["rates"][m]["any"] for m in MODELS}, "interval": c["comparison"]["any"]})
    return out


def draw_comparison(ax, entry: dict) -> None:
    """One metric's chart: base and fine-tuned bars in their colours on one axis from zero; with an interval, a
    dashed line at the base and a whisker on the fine-tuned bar spanning base + the 95% interval of the difference
    (it clears the line when the difference is significant), the difference and its interval in the title."""
    values, iv, digits = entry["values"], entry["interval"], entry["digits"]
    ax.bar([f"{LABELS[m]}\n{values[m]:.{digits}f}" for m in MODELS], [values[m] for m in MODELS],
           color=[COLORS[m] for m in MODELS])
    top = max(values.values())
    title = entry["title"]
    if iv is not None:
        base = values["base"]
        ax.axhline(base, color=COLORS["base"], linestyle="--", linewidth=1)
        low, high = base + iv["low"], base + iv["high"]
        ax.errorbar([1], [values["finetuned"]], yerr=[[max(values["finetuned"] - low, 0)],
                                                       [max(high - values["finetuned"], 0)]],
                    fmt="none", ecolor="black", capsize=6)
        top = max(top, high)
        title += (f"\nfine-tuned - base {iv['delta']:+.{digits}f} [{iv['low']:+.{digits}f}, "
                  f"{iv['high']:+.{digits}f}]" + (f"\n{iv['verdict']}" if iv.get("verdict") else ""))
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, top * 1.25 or 1)


def plot_metrics(metrics: dict, path: Path) -> None:
    """The report's metrics.png: a panel a metric (`comparisons`), base and fine-tuned side by side on its scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = comparisons(metrics)
    fig, axes = plt.subplots(1, len(entries), figsize=(3.3 * len(entries), 3.8), squeeze=False)
    for ax, entry in zip(axes[0], entries):
        draw_comparison(ax, entry)
    fig.suptitle(f"base vs fine-tuned on {metrics['n']} examples (whiskers: 95% interval of the difference)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def comparison_images(metrics: dict) -> dict:
    """One chart a metric (`draw_comparison`) as a PIL image, by metric key: for MLflow's chart grid."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    images = {}
    for entry in comparisons(metrics):
        fig, ax = plt.subplots(figsize=(4.4, 3.3))
        draw_comparison(ax, entry)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        images[entry["key"]] = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return images


def comparison_table(metrics: dict) -> pd.DataFrame:
    """The comparison as a table, one row a metric: both models' values, the difference with its 95% interval and
    verdict (none for the length ratio, which has no paired interval)."""
    rows = [{"metric": e["title"], "base": e["values"]["base"], "fine-tuned": e["values"]["finetuned"],
             **({"difference": e["interval"]["delta"], "low": e["interval"]["low"], "high": e["interval"]["high"],
                 "verdict": e["interval"].get("verdict")} if e["interval"] else {})}
            for e in comparisons(metrics)]
    if all("length_ratio" in metrics[m] for m in MODELS):
        rows.append({"metric": "median length / reference (characters)", "base": metrics["base"]["length_ratio"],
                     "fine-tuned": metrics["finetuned"]["length_ratio"]})
    return pd.DataFrame(rows, columns=["metric", "base", "fine-tuned", "difference", "low", "high", "verdict"])


def decoding(cfg: EvalConfig) -> dict:
    """The generation settings evaluation uses; the registered model and the demo decode the same way."""
    return {"batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
            "repetition_penalty": cfg.repetition_penalty, "no_repeat_ngram_size": cfg.no_repeat_ngram_size}


def evaluate_frame(model, tokenizer, test: pd.DataFrame, system_prompt: str, cfg: EvalConfig,
                   logger=log) -> tuple[pd.DataFrame, dict]:
    """Generate with the adapter off and on, then score both against the references; progress goes to `logger`."""
    from desctune.progress import Progress

    titles = test["title"].tolist()

    def progress(model_label: str):
        tracker = Progress(logger, f"evaluate: {model_label} model, titles", len(titles), "title")
        tracker.update(0)
        return tracker.update

    with base_context(model):
        base_out = generate(model, tokenizer, titles, system_prompt, **decoding(cfg), progress=progress("base"))
    tuned_out = generate(model, tokenizer, titles, system_prompt, **decoding(cfg), progress=progress("fine-tuned"))
    logger.info("evaluate: scoring %d pairs of outputs (BLEU, ROUGE-L, chrF++, invented claims, paired bootstrap)",
                len(titles))
    df, metrics = score(test["content"].tolist(), {"base": base_out, "finetuned": tuned_out})
    df.insert(0, "title", titles)
    if "uid" in test:
        df.insert(0, "uid", test["uid"].tolist())
    score_claims(df, metrics)
    return df, metrics


def evaluate_adapter(
    adapter_dir: str, data_path: str, cfg: EvalConfig, artifacts_dir: str, out_dir: Path, refuse_inert: bool = False,
    logger=None,
) -> dict:
    """Evaluate an adapter on a Parquet of (uid,) title, content: eval.parquet, metrics.png/.json and report.md.

    With refuse_inert, an adapter that cannot change anything fails before generating; the identical-outputs check
    is the caller's, after publishing the report, so a refused run still shows why.
    """
    out_dir = start_stage(out_dir, log)
    test = pd.read_parquet(data_path)
    if cfg.limit is not None:
        test = test.head(cfg.limit)
    model, tokenizer, meta = load_adapter_model(adapter_dir, artifacts_dir)
    status = adapter_status(model)
    if refuse_inert:
        guard_adapter(status)
    df, metrics = evaluate_frame(model, tokenizer, test, meta["system_prompt"], cfg, logger or log)
    paths = {k: out_dir / f for k, f in (("eval_path", "eval.parquet"), ("plot_path", "metrics.png"),
                                          ("metrics_path", "metrics.json"), ("report_path", "report.md"))}
    write_parquet(df, paths["eval_path"])
    plot_metrics(metrics, paths["plot_path"])
    with atomic_path(paths["metrics_path"]) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    with atomic_path(paths["report_path"]) as tmp:
        tmp.write_text(markdown_report(metrics, df))
    return {"metrics": metrics, "adapter_status": status, **{k: str(v) for k, v in paths.items()}}


def evaluate_file(adapter_dir: str, data: DataConfig, cfg: EvalConfig, artifacts_dir: str, out_dir: Path) -> dict:
    """Evaluate on a raw trn.json-style file, through the flow's own ingest and clean steps."""
    from desctune.data.clean import clean_file
    from desctune.data.ingest import ingest_file

    cleaned = clean_file(ingest_file(data, out_dir / "data"), data, out_dir / "data")
    return evaluate_adapter(adapter_dir, cleaned["path"], cfg, artifacts_dir, out_dir) | {"data": cleaned}


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cell(text, n: int) -> str:
    """Text made safe for one markdown table cell, shortened at a word boundary (with "…") when over n characters."""
    text = str(text).replace("|", "/").replace("\n", " ")
    if len(text) <= n:
        return text
    cut = text[: n - 1].rsplit(" ", 1)[0] if " " in text[: n - 1] else text[: n - 1]
    return cut.rstrip(" ,;:") + "…"


def claims_report(metrics: dict, df: pd.DataFrame, examples: int = 5) -> list[str]:
    """The invented-claims section of the report: rates per model and kind, the paired interval of each, and the
    outputs with the most flagged spans, each span with its kind."""
    c = metrics["claims"]
    rates = c["rates"]
    cols = [m for m in ("base", "finetuned", "reference") if m in rates]
    names = {"base": "base", "finetuned": "fine-tuned", "reference": "reference"}
    lines = [
        "### Invented claims",
        "",
        "Share of outputs making at least one claim the title cannot support (desctune.evaluation.claims; the "
        "references are the shop's own texts, shown for what the model learned from).",
        "",
        "| kind | " + " | ".join(names[m] for m in cols) + " | fine-tuned − base (95% CI) |",
        "|---|" + "---|" * len(cols) + "---|",
    ]
    for kind in ("any", *cl.KINDS):
        iv = c["comparison"][kind]
        label = "any kind" if kind == "any" else cl.KIND_LABELS[kind]
        lines.append(f"| {label} | " + " | ".join(f"{rates[m][kind]:.0%}" for m in cols)
                     + f" | {iv['delta'] * 100:+.0f} pts [{iv['low'] * 100:+.0f}, {iv['high'] * 100:+.0f}] "
                       f"({iv['verdict']}) |")
    flagged = [(i, json.loads(df.at[i, f"{m}_claims"]), m) for i in df.index for m in MODELS
               if f"{m}_claims" in df and df.at[i, f"{m}_claims"] != "[]"]
    flagged.sort(key=lambda x: -len(x[1]))
    if flagged:
        lines += ["", "| title | model | flagged spans (kind: text) |", "|---|---|---|"]
        for i, found, m in flagged[:examples]:
            spans = "; ".join(f"{x['kind']}: {_cell(x['text'], 60)}" for x in found)
            lines.append(f"| {_cell(df.at[i, 'title'], 60)} | {names[m]} | {_cell(spans, 300)} |")
    return lines


def markdown_report(metrics: dict, df: pd.DataFrame, worst: int = 5) -> str:
    """The report a person reads: both models' scores, the better/worse/same count and the examples that got worst."""
    lines = [
        f"## Evaluation on {metrics['n']} examples",
        "",
        "| model | corpus BLEU (0-100) | ROUGE-L F (mean, 0-1) | chrF++ (0-100) | median length / reference |",
        "|---|---|---|---|---|",
        *(f"| {m} | {metrics[m]['bleu']:.2f} | {metrics[m]['rougeL']:.4f} | {metrics[m]['chrf']:.2f} "
          f"| {metrics[m]['length_ratio']:.2f} |" for m in MODELS),
        "",
        *(f"- {line}" for line in significance_lines(metrics)),
        "",
        f"Fine-tuned better on {metrics['better']}, worse on {metrics['worse']}, same on {metrics['same']} examples "
        f"(by ROUGE-L; sign test p = {metrics['sign_test_p']:.3g}); outputs identical to the base on "
        f"{metrics['identical_outputs']:.0%}. Intervals: paired bootstrap over examples, {metrics['resamples']} "
        "resamples, seeded.",
        "",
        "Median output/reference length by reference length (characters): "
        + "; ".join(f"{bucket} ({metrics['base']['length_ratio_by_reference_chars'][bucket]['n']} examples): "
                    + ", ".join(f"{m} {_ratio(metrics[m]['length_ratio_by_reference_chars'][bucket]['median'])}"
                                for m in MODELS)
                    for bucket in metrics["base"]["length_ratio_by_reference_chars"]) + ".",
        "",
        "### Examples that got worst",
        "",
        "| title | base ROUGE-L | fine-tuned ROUGE-L | base output | fine-tuned output |",
        "|---|---|---|---|---|",
    ]
    got_worse = df[df["delta_rougeL"] < 0]
    if got_worse.empty:
        lines[-2:] = ["No example got worse by ROUGE-L."]
    for _, row in got_worse.nsmallest(worst, "delta_rougeL").iterrows():
        lines.append(
            f"| {_cell(row['title'], 60)} | {row['base_rougeL']:.3f} | {row['finetuned_rougeL']:.3f} "
            f"| {_cell(row['base_output'], 120)} | {_cell(row['finetuned_output'], 120)} |"
        )
    if "claims" in metrics:
        lines += ["", *claims_report(metrics, df)]
    return "\n".join(lines)

