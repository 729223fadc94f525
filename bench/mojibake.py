"""Mojibake left after cleaning the shipped data: ftfy alone against ftfy plus `desctune.data.clean.repair_remnants`.

For every title and content of each file (data/*.jsonl and data/*.json by default), counts the texts that show
mis-decoding before cleaning (a cp1252 signature such as â€™ or Ã©), and the cleaned texts that still hold a remnant
(a lone Â before whitespace or at the end, Ã + whitespace after a lowercase letter, an Â/Ã pair such as Ã© or Â°)
when cleaned with ftfy alone and with today's cleaner. Ends with one key=value line of the totals.

    python -m bench.mojibake [FILE ...]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from unittest import mock

from desctune.data import clean

ROOT = Path(__file__).resolve().parents[1]
REMNANT = re.compile(f"\u00c2(?=\\s|$)|(?<=[a-z\u00df-\u00ff])\u00c3(?=\\s)|[\u00c2\u00c3][\\x80-\\xbf{clean._CP1252_HIGH}]")


def texts(path: Path):
    """Titles and contents of a JSON Lines file or a JSON array."""
    raw = path.read_text(encoding="utf-8-sig")
    records = json.loads(raw) if raw.lstrip().startswith("[") else [json.loads(x) for x in raw.splitlines() if x.strip()]
    for r in records:
        for key in ("title", "content"):
            if isinstance(r.get(key), str):
                yield r[key]


def ftfy_only(s: str) -> str:
    return clean.ftfy.fix_text(s, clean._FTFY)


def counts(path: Path) -> dict:
    items = list(texts(path))
    now = [clean.clean_text(s) for s in items]
    with mock.patch.object(clean, "_mojibake", ftfy_only):  # the cleaner as it was: ftfy, nothing after it
        before = [clean.clean_text(s) for s in items]
    return {
        "texts": len(items),
        "mis_decoded_raw": sum(bool(clean._SIGNS_RE.search(s)) for s in items),
        "remnants_ftfy_only": sum(bool(REMNANT.search(s)) for s in before),
        "remnants_now": sum(bool(REMNANT.search(s)) for s in now),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path)
    args = p.parse_args(argv)
    files = args.files or sorted([*(ROOT / "data").glob("*.jsonl"), *(ROOT / "data").glob("*.json")])
    total: dict[str, int] = {}
    for f in files:
        c = counts(f)
        print(f"{f.name}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    print(" ".join(f"{k}={v}" for k, v in total.items()))


if __name__ == "__main__":
    main()
