"""Sample: a deterministic train/val/test split of the clean records, then a seeded sample of the train split.

A record's split follows from a hash of (seed, uid), not from its position, so a record stays in the same split when
the data grows or is re-read: retraining never leaks last week's test records into training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from desctune.config import DataConfig
from desctune.files import start_stage, write_parquet

SPLITS = ("train", "val", "test")
# The data settings that change the splits.
SAMPLE_FIELDS = ("seed", "val_fraction", "test_fraction", "train_size")


def split_buckets(uids: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per uid, stable for a given seed."""
    def bucket(uid: str) -> float:
        digest = hashlib.blake2b(f"{seed}\x1f{uid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    return np.fromiter((bucket(u) for u in uids.astype(str)), dtype=np.float64, count=len(uids))


def split_frame(df: pd.DataFrame, data: DataConfig) -> dict[str, pd.DataFrame]:
    """80/10/10 (configurable) split by uid hash; the train split sampled down to `train_size` with the seed."""
    b = split_buckets(df["uid"], data.seed)
    test = b < data.test_fraction
    val = (b >= data.test_fraction) & (b < data.test_fraction + data.val_fraction)
    train = ~(test | val)
    parts = {"train": df[train], "val": df[val], "test": df[test]}
    if data.train_size is not None and len(parts["train"]) > data.train_size:
        parts["train"] = parts["train"].sample(n=data.train_size, random_state=data.seed)
    return {k: v.sort_values("uid", kind="stable").reset_index(drop=True) for k, v in parts.items()}


def sample_file(clean: dict, data: DataConfig, out_dir: Path) -> dict:
    out_dir = start_stage(out_dir)
    df = pd.read_parquet(clean["path"], columns=["uid", "title", "content"])
    parts = split_frame(df, data)
    result: dict = {"input_sha256": clean["sha256"]}
    for name, part in parts.items():
        if part.empty:
            raise ValueError(
                f"the {name} split is empty ({len(df)} clean records): use more data or larger split fractions"
            )
        path = out_dir / f"{name}.parquet"
        result[name] = {"path": str(path), "sha256": write_parquet(part, path), "rows": len(part)}
    return result

