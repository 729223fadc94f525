"""`desctune evaluate`, `desctune promote` and `desctune rollback`: the registry from the command line.

    desctune evaluate --model REF --data PATH [--limit N] [--out metrics.json]
    desctune promote NAME VERSION [--reason TEXT]
    desctune rollback NAME [--reason TEXT]

REF is models:/NAME@ALIAS, models:/NAME/VERSION or an adapter directory. The data goes through the finetune flow's
own ingest and clean steps. The store is the config's (default: artifacts/mlflow.db, or $MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.runtime import add_config_flags, config_from_args


def comparison_table(label: str, data_path: str, metrics: dict) -> str:
    """Base vs fine-tuned scores, their difference with its interval, the better/worse/same count and lengths."""
    from desctune.evaluation.evaluate import significance_lines

    b, f = metrics["base"], metrics["finetuned"]
    return "\n".join([
        f"{label} on {metrics['n']} examples of {data_path}",
        f"{'':12}{'BLEU':>8}{'ROUGE-L':>10}{'chrF++':>8}{'length':>8}",
        f"{'base':12}{b['bleu']:8.2f}{b['rougeL']:10.4f}{b['chrf']:8.2f}{b['length_ratio']:8.2f}",
        f"{'fine-tuned':12}{f['bleu']:8.2f}{f['rougeL']:10.4f}{f['chrf']:8.2f}{f['length_ratio']:8.2f}",
        f"{'difference':12}{f['bleu'] - b['bleu']:+8.2f}{f['rougeL'] - b['rougeL']:+10.4f}"
        f"{f['chrf'] - b['chrf']:+8.2f}",
        *significance_lines(metrics),
        f"fine-tuned better on {metrics['better']}, worse on {metrics['worse']}, same on {metrics['same']} "
        f"(by ROUGE-L; sign test p = {metrics['sign_test_p']:.3g}); length = median output / reference characters",
    ])


def metrics_json(metrics: dict) -> dict:
    """The documented metrics.json shape (docs/evaluation.md, "Evaluating a version on other data"), nothing more."""
    models = {m: {k: metrics[m][k] for k in ("bleu", "rougeL", "chrf", "length_ratio")} for m in ("base", "finetuned")}
    comparison = {k: {f: v[f] for f in ("delta", "low", "high", "verdict")} for k, v in metrics["comparison"].items()}
    out = {"n": metrics["n"], **models, "difference": comparison,
           "wins": {k: metrics[k] for k in ("better", "worse", "same")}, "sign_test_p": metrics["sign_test_p"]}
    if "claims" in metrics:
        out["claims"] = {"rates": metrics["claims"]["rates"], "difference": metrics["claims"]["comparison"]}
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from desctune.data.ingest import source_fingerprint
    from desctune.errors import DataError
    from desctune.evaluation.evaluate import IDENTICAL_LIMIT, evaluate_file
    from desctune.files import atomic_path
    from desctune.registry.register import resolve_model
    from desctune.stages import stage_folder

    cfg = config_from_args(args)
    eval_cfg = cfg.eval.updated(limit=args.limit)
    if not Path(args.data).is_file():
        raise DataError(f"data file not found: {args.data}")
    model = resolve_model(cfg, args.model)
    data = cfg.data.for_scoring(args.data)
    out_dir = stage_folder(cfg.artifacts_dir, "evaluate-cli", model["adapter_sha256"], source_fingerprint(args.data),
                           data, eval_cfg)
    result = evaluate_file(model["adapter_path"], data, eval_cfg, cfg.artifacts_dir, out_dir)
    print(comparison_table(model["label"], args.data, result["metrics"]))
    print(f"per-example table {result['eval_path']}, chart {result['plot_path']}")
    if result["metrics"]["identical_outputs"] >= IDENTICAL_LIMIT:
        print(f"warning: the fine-tuned outputs equal the base outputs on {result['metrics']['identical_outputs']:.0%} "
              f"of examples: the adapter has (almost) no effect")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(metrics_json(result["metrics"]), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from desctune.registry.register import CHAMPION, current_user, get_alias, get_version, set_champion
    from desctune.tracking import client

    cfg = config_from_args(args)
    c = client(cfg)
    version = str(get_version(c, args.name, args.version).version)
    previous = get_alias(c, args.name, CHAMPION)
    if previous is not None and str(previous.version) == version:
        print(f"{args.name} version {version} is already the champion")
        return 0
    who = current_user()
    set_champion(c, args.name, version, who, args.reason)
    was = f"was version {previous.version}" if previous else "no champion before"
    print(f"{args.name}: @champion -> version {version} ({was}), by {who}: {args.reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from desctune.registry.register import current_user, rollback_champion
    from desctune.tracking import client

    cfg = config_from_args(args)
    who = current_user()
    was, now = rollback_champion(client(cfg), args.name, who, args.reason)
    print(f"{args.name}: @champion rolled back from version {was} to version {now}, by {who}: {args.reason}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a registered model or adapter against its base on a data file")
    p.add_argument("--model", required=True, metavar="REF", help="models:/NAME@ALIAS, models:/NAME/VERSION or DIR")
    p.add_argument("--data", required=True, metavar="PATH", help="trn.json-style JSON Lines file (.gz ok)")
    p.add_argument("--limit", type=int, help="evaluate the first N usable records only (default: all)")
    p.add_argument("--out", metavar="metrics.json", help="write {n, base, finetuned} BLEU and ROUGE-L here")
    add_config_flags(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("promote", help="make a model version the champion by hand (who and why go into tags)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--reason", default="promoted by hand", help="why (recorded in the version's tags)")
    add_config_flags(p)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="move the champion back to the previous champion")
    p.add_argument("name")
    p.add_argument("--reason", default="rolled back by hand", help="why (recorded in the version's tags)")
    add_config_flags(p)
    p.set_defaults(func=cmd_rollback)
