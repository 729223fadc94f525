"""How good is the invented-claims detector? Precision and recall per kind against outputs labelled by reading.

`tests/data/claims_labels.jsonl` holds real outputs of the default champion and its base (the shipped held-out file
and the Abt electronics file), each labelled by a reader, blind to the model and to the detector, for whether it
makes a claim its title cannot support, by kind (praise, boilerplate, number, entity, and "other" for unsupported
claims of no kind the detector knows). Per kind, at the level of outputs: precision = of the outputs the detector
flags for that kind, the share the reader labelled so; recall = of the outputs the reader labelled, the share the
detector flags. "any" compares the detector's any-kind flag with the reader's four kinds, and "any, other included"
with every unsupported claim the reader found.

    python -m bench.claims [--labels tests/data/claims_labels.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from desctune.evaluation.claims import KINDS, find_claims

LABELS = Path(__file__).resolve().parent.parent / "tests" / "data" / "claims_labels.jsonl"


def load(path: Path = LABELS) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pr(pairs: list[tuple[bool, bool]]) -> dict:
    """pairs of (detector flagged, reader labelled)."""
    tp = sum(d and r for d, r in pairs)
    flagged, labelled = sum(d for d, _ in pairs), sum(r for _, r in pairs)
    return {"precision": tp / flagged if flagged else None, "recall": tp / labelled if labelled else None,
            "flagged": flagged, "labelled": labelled, "both": tp}


def detector_scores(rows: list[dict]) -> dict:
    """Precision and recall of `find_claims` per kind, 'any' and 'any_other' (the reader's 'other' included)."""
    found = [{c.kind for c in find_claims(r["output"], r["title"])} for r in rows]
    out = {kind: _pr([(kind in f, bool(r[kind])) for f, r in zip(found, rows)]) for kind in KINDS}
    out["any"] = _pr([(bool(f), any(r[k] for k in KINDS)) for f, r in zip(found, rows)])
    out["any_other"] = _pr([(bool(f), any(r[k] for k in (*KINDS, "other"))) for f, r in zip(found, rows)])
    return out


def table(scores: dict, n: int) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    lines = [f"Detector against {n} outputs labelled by reading:", "",
             "| kind | labelled | flagged | both | precision | recall |", "|---|---|---|---|---|---|"]
    for kind, s in scores.items():
        name = {"any": "any of the four kinds", "any_other": "any unsupported claim (reader's 'other' too)"}.get(
            kind, kind)
        lines.append(f"| {name} | {s['labelled']} | {s['flagged']} | {s['both']} | {pct(s['precision'])} | "
                     f"{pct(s['recall'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=Path, default=LABELS)
    args = ap.parse_args()
    rows = load(args.labels)
    print(table(detector_scores(rows), len(rows)))
    by = {}
    for r in rows:
        by.setdefault((r["source"], r["model"]), []).append(r)
    print("\nLabelled share of outputs with a claim of the four kinds (reader), by file and model:")
    for (source, model), part in sorted(by.items()):
        share = sum(any(r[k] for k in KINDS) for r in part) / len(part)
        other = sum(any(r[k] for k in (*KINDS, "other")) for r in part) / len(part)
        flagged = sum(bool(find_claims(r["output"], r["title"])) for r in part) / len(part)
        print(f"  {source:8} {model:10} n={len(part):3}  reader {share:.0%} (any unsupported {other:.0%}), "
              f"detector {flagged:.0%}")


if __name__ == "__main__":
    main()
