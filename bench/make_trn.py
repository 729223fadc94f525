"""Write a synthetic trn.json in AmazonTitles-1.3MM's real format, for the data-stage benchmark.

Text comes from the shipped real sample (titles and sentences recombined), so entities, stubs and word shapes are
real. Shape follows the facts in data/README.md: 54% of contents ≥ 100 chars (median ≈ 410, mean ≈ 530
among them), the rest empty or short; about 18% of non-empty contents carry HTML entities; ~20% of long ones end in a
"--This text refers to ..." stub; each line has `target_ind`/`target_rel` lists like the real file.

    python -m bench.make_trn --records 2248619 --out /tmp/trn.json [--gzip]
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import random
import re
from pathlib import Path

import numpy as np
import orjson

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "amazon_titles_sample.jsonl"
ENTITY = re.compile(r"&#?\w+;")
STUB = re.compile(r"\s*-*\s*This text refers to [^.]*?edition(?: of this title)?\.")


def _pools(sample: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    titles, plain, with_entities, stubs = [], [], [], []
    for line in sample.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        titles.append(rec["title"])
        content = rec["content"]
        stubs.extend(m.group().strip() for m in STUB.finditer(content))
        for sentence in re.split(r"(?<=[.!?])\s+", STUB.sub("", content)):
            if len(sentence) < 20:
                continue
            if ENTITY.search(sentence):
                with_entities.append(sentence)
            plain.append(html.unescape(sentence))
    return titles, plain, with_entities, stubs


def _content(rng: random.Random, length: int, plain: list[str], ents: list[str], entity: bool) -> str:
    parts: list[str] = [rng.choice(ents)] if entity else []
    size = len(parts[0]) if parts else 0
    while size < length:
        s = rng.choice(plain)
        parts.append(s)
        size += len(s) + 1
    rng.shuffle(parts)
    text = " ".join(parts)
    if len(text) > length:
        cut = text.rfind(" ", 0, length)
        text = text[: cut if cut > length // 2 else length]
    return text


def write_trn(records: int, out: Path, seed: int = 0, gz: bool = False) -> int:
    """Write `records` JSON lines to `out` (gzip when asked); return the bytes written (uncompressed)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    titles, plain, ents, stubs = _pools(SAMPLE)
    kind = nrng.random(records)
    long_len = np.clip(nrng.lognormal(np.log(410), 0.7165, records), 100, 6000).astype(int)
    short_len = nrng.integers(5, 100, records)
    n_targets = nrng.integers(5, 25, records)
    out.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if gz else open
    written = 0
    with opener(out, "wb") as f:
        buf: list[bytes] = []
        for i in range(records):
            if kind[i] < 0.541:
                content = _content(rng, int(long_len[i]), plain, ents, rng.random() < 0.23)
                if rng.random() < 0.2:
                    content += rng.choice(stubs)
            elif kind[i] < 0.86:
                content = ""
            else:
                content = _content(rng, int(short_len[i]), plain, ents, False)
            title = rng.choice(titles)
            if rng.random() < 0.5:
                title = f"{title} {rng.choice(['(Paperback)', 'Vol. ' + str(rng.randint(1, 9)), 'Edition ' + str(rng.randint(1, 5)), 'DVD', 'Set of ' + str(rng.randint(2, 12))])}"
            k = int(n_targets[i])
            line = orjson.dumps(
                {
                    "uid": f"{i:010d}",
                    "title": title,
                    "content": content,
                    "target_ind": [rng.randrange(2_248_619) for _ in range(k)],
                    "target_rel": [1.0] * k,
                }
            )
            buf.append(line)
            written += len(line) + 1
            if len(buf) >= 10_000:
                f.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            f.write(b"\n".join(buf) + b"\n")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=2_248_619)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true", help="gzip the output (also implied by a .gz suffix)")
    args = p.parse_args(argv)
    n = write_trn(args.records, args.out, args.seed, args.gzip or args.out.suffix == ".gz")
    print(f"records={args.records} bytes={n} path={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
