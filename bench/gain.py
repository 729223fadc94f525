"""Is a setting's gain over the base real? Train the default profile with overrides, then score base vs fine-tuned.

The selection set is the 94 records of the shipped sample's val and test splits as the unfiltered split makes them
(blurbs included): no run trains on them, so settings are chosen there. `--heldout` also scores the first 100 records
of `data/amazon_titles_eval.jsonl` that pass the length filters, the check the README reports: use it once for a
chosen setting, not to choose. Each scoring prints ROUGE-L for both models, the paired 95% interval of the difference
(1,000 bootstrap resamples), better/worse counts, median length ratios and the invented-claims rates of both models
and the references (with the paired interval of fine-tuned - base); `--abt N` also counts how often each model talks
of a book for the first N titles of the Abt electronics file (none is a book). It appends the row to OUT/results.jsonl;
the per-example tables go to OUT/NAME/{selection,heldout}.parquet. Base outputs are cached per (records, system
prompt, decoding), so a second setting with the same decoding pays for the fine-tuned model's generation only.

    python -m bench.gain C                     # the default profile as it is (run C in docs/LOG.md)
    python -m bench.gain C --adapter OUT/C/train/adapter --heldout --skip-selection
    python -m bench.gain A --set data.reject_blurbs=false --set train.epochs=1 --set eval.repetition_penalty=1.2
    python -m bench.gain S --train-lever strip --abt 50     # a lever against invented claims, and book talk
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import time
from pathlib import Path

import pandas as pd

from desctune.config import DataConfig, EvalConfig, load_config
from desctune.data.clean import clean_file
from desctune.data.ingest import ingest_file
from desctune.data.sample import sample_file
from desctune.data.tokenize import tokenize_splits
from desctune.evaluation.claims import find_claims
from desctune.evaluation.evaluate import decoding, score, score_claims
from desctune.evaluation.generation import base_context, generate, load_adapter_model
from desctune.models import provision
from desctune.training.loop import train_adapter

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "configs" / "cpu.yaml"
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
HELDOUT = ROOT / "data" / "amazon_titles_eval.jsonl"
ABT = ROOT / "data" / "abt_electronics.jsonl"


def cleaned(data: DataConfig, work: Path) -> dict:
    return clean_file(ingest_file(data, work / "ingest"), data, work / "clean")


def splits(data: DataConfig, work: Path) -> dict:
    return sample_file(cleaned(data, work), data, work / "sample")


def selection_set(out: Path) -> pd.DataFrame:
    parts = splits(load_config(PROFILE).data.for_scoring(SAMPLE), out / "selection")
    return pd.concat([pd.read_parquet(parts[s]["path"]) for s in ("val", "test")], ignore_index=True)


def heldout_set(out: Path) -> pd.DataFrame:
    return pd.read_parquet(cleaned(DataConfig().for_scoring(HELDOUT), out / "heldout")["path"]).head(100)


def base_outputs(model, tokenizer, df: pd.DataFrame, system_prompt: str, cfg: EvalConfig, out: Path) -> list[str]:
    key = hashlib.sha256(json.dumps([df["uid"].tolist(), system_prompt, decoding(cfg)]).encode()).hexdigest()[:16]
    cached = out / "base-outputs" / f"{key}.pkl"
    if cached.exists():
        return pickle.loads(cached.read_bytes())
    with base_context(model):
        outputs = generate(model, tokenizer, df["title"].tolist(), system_prompt, **decoding(cfg))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(pickle.dumps(outputs))
    return outputs


def judge(model, tokenizer, df: pd.DataFrame, system_prompt: str, cfg: EvalConfig, out: Path, table: Path) -> dict:
    start = time.time()
    base = base_outputs(model, tokenizer, df, system_prompt, cfg, out)
    tuned = generate(model, tokenizer, df["title"].tolist(), system_prompt, **decoding(cfg))
    frame, m = score(df["content"].tolist(), {"base": base, "finetuned": tuned})
    frame.insert(0, "title", df["title"].tolist())
    score_claims(frame, m)
    frame.to_parquet(table)
    c, claims = m["comparison"]["rougeL"], m["claims"]
    k = claims["comparison"]["any"]
    return {"n": len(df), "base": round(m["base"]["rougeL"], 4), "finetuned": round(m["finetuned"]["rougeL"], 4),
            "delta": round(c["delta"], 4), "low": round(c["low"], 4), "high": round(c["high"], 4),
            "better": m["better"], "worse": m["worse"],
            "length_ratio_base": round(m["base"]["length_ratio"], 2),
            "length_ratio_finetuned": round(m["finetuned"]["length_ratio"], 2),
            "claims_base": round(claims["rates"]["base"]["any"], 3),
            "claims_finetuned": round(claims["rates"]["finetuned"]["any"], 3),
            "claims_reference": round(claims["rates"]["reference"]["any"], 3),
            "claims_delta": round(k["delta"], 3), "claims_low": round(k["low"], 3), "claims_high": round(k["high"], 3),
            "seconds": round(time.time() - start)}


# A description that talks of a book (for a title that names no book: the Abt electronics titles).
BOOK_TALK = re.compile(r"\b(?:book|books|novel|author|authors|reader|readers|chapters?|pages|paperback|hardcover)\b",
                       re.IGNORECASE)


def book_talk(model, tokenizer, system_prompt: str, cfg: EvalConfig, n: int, out: Path) -> dict:
    """The share of outputs that talk of a book for the first `n` titles of the shipped Abt electronics file (none
    of them a book), for both models, with the paired interval of fine-tuned - base."""
    from desctune.evaluation.significance import paired_mean

    titles = [json.loads(line)["title"] for line in ABT.read_text(encoding="utf-8").splitlines()[:n]]
    df = pd.DataFrame({"uid": [f"abt-{i}" for i in range(n)], "title": titles})
    base = base_outputs(model, tokenizer, df, system_prompt, cfg, out)
    tuned = generate(model, tokenizer, titles, system_prompt, **decoding(cfg))
    has = [[float(bool(BOOK_TALK.search(o))) for o in outs] for outs in (base, tuned)]
    iv = paired_mean(*has)
    return {"n": n, "book_talk_base": round(sum(has[0]) / n, 3), "book_talk_finetuned": round(sum(has[1]) / n, 3),
            "delta": round(iv["delta"], 3), "low": round(iv["low"], 3), "high": round(iv["high"], 3)}


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def strip_claim_sentences(content: str, title: str) -> str:
    """`content` less its sentences that carry praise, a review source or publisher boilerplate."""
    kept = [s for s in SENTENCE_END.split(content)
            if not any(c.kind in ("praise", "boilerplate") for c in find_claims(s, title))]
    return " ".join(kept)


def adjusted(parts: dict, mode: str | None, mix_abt: int, min_chars: int, work: Path) -> tuple[dict, dict]:
    """The training split changed by a lever: `strip` drops praise and boilerplate sentences from each content
    (records left under `min_chars` go), `drop` drops records whose content makes any claim the title cannot support;
    `mix_abt` adds that many Abt electronics records (from the 101st on: the first 100 are for scoring)."""
    if not mode and not mix_abt:
        return parts, {}
    df = pd.read_parquet(parts["train"]["path"], columns=["uid", "title", "content"])
    before = len(df)
    if mode == "strip":
        df = df.assign(content=[strip_claim_sentences(c, t) for c, t in zip(df["content"], df["title"])])
        df = df[df["content"].str.len() >= min_chars]
    elif mode == "drop":
        df = df[[not find_claims(c, t) for c, t in zip(df["content"], df["title"])]]
    if mix_abt:
        abt = [json.loads(line) for line in ABT.read_text(encoding="utf-8").splitlines()[100 : 100 + mix_abt]]
        df = pd.concat([df, pd.DataFrame(abt)[["uid", "title", "content"]]], ignore_index=True)
    path = work / "train-adjusted.parquet"
    work.mkdir(parents=True, exist_ok=True)
    df.reset_index(drop=True).to_parquet(path)
    return {**parts, "train": {**parts["train"], "path": str(path)}}, {"train_before_lever": before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a name for this setting: OUT/NAME holds its stages and tables")
    ap.add_argument("--set", action="append", default=[], help="section.key=value over configs/cpu.yaml")
    ap.add_argument("--out", default="/tmp/desctune-gain", help="working folder (default: %(default)s)")
    ap.add_argument("--adapter", help="score this adapter folder instead of training one")
    ap.add_argument("--heldout", action="store_true", help="also score the held-out file's first 100 records")
    ap.add_argument("--skip-selection", action="store_true", help="do not score the selection set")
    ap.add_argument("--train-lever", choices=["strip", "drop"],
                    help="strip praise and boilerplate sentences from the training contents, or drop the records "
                         "whose content makes a claim its title cannot support")
    ap.add_argument("--mix-abt", type=int, default=0, metavar="N", help="add N Abt electronics records to training")
    ap.add_argument("--abt", type=int, default=0, metavar="N",
                    help="also count book talk in both models' outputs for the first N Abt electronics titles")
    args = ap.parse_args()
    out = Path(args.out)
    cfg = load_config(PROFILE, [f"data.path={SAMPLE}", *args.set,
                                f"artifacts_dir={out / 'artifacts'}"])
    work = out / args.name
    row: dict = {"name": args.name, "set": args.set}
    if args.adapter:
        adapter = args.adapter
    else:
        base = provision(cfg.model.name, cfg.artifacts_dir)
        parts, lever = adjusted(splits(cfg.data, work), args.train_lever, args.mix_abt, cfg.data.min_content_chars,
                                work)
        row |= lever
        tokens = tokenize_splits(parts, base, cfg.model, work / "tokens")
        start = time.time()
        trained = train_adapter(tokens, base, cfg, work / "train", progress_seconds=60)
        adapter = trained["adapter_path"]
        row |= {"train_records": tokens["train"]["rows"], "train_seconds": round(time.time() - start),
                "val_loss": round(trained["val_loss"], 4)}
    model, tokenizer, meta = load_adapter_model(adapter, cfg.artifacts_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_selection:
        row["selection"] = judge(model, tokenizer, selection_set(out), meta["system_prompt"], cfg.eval, out,
                                 work / "selection.parquet")
    if args.heldout:
        row["heldout"] = judge(model, tokenizer, heldout_set(out), meta["system_prompt"], cfg.eval, out,
                               work / "heldout.parquet")
    if args.abt:
        row["abt"] = book_talk(model, tokenizer, meta["system_prompt"], cfg.eval, args.abt, out)
    with open(out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
