"""Sample: deterministic, disjoint splits that follow the uid, and a seeded train sample."""

import pandas as pd

from desctune.config import DataConfig
from desctune.data.sample import split_frame


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"uid": [f"U{i:05d}" for i in range(n)], "title": ["t"] * n, "content": ["c"] * n})


def test_split_is_80_10_10_disjoint_and_complete():
    parts = split_frame(frame(5000), DataConfig())
    sizes = {k: len(v) for k, v in parts.items()}
    assert sum(sizes.values()) == 5000
    assert 3850 <= sizes["train"] <= 4150 and 420 <= sizes["test"] <= 580 and 420 <= sizes["val"] <= 580
    uids = [set(v["uid"]) for v in parts.values()]
    assert not (uids[0] & uids[1] or uids[0] & uids[2] or uids[1] & uids[2])


def test_split_is_deterministic_and_stable_when_data_grows():
    small, big = split_frame(frame(1000), DataConfig()), split_frame(frame(3000), DataConfig())
    again = split_frame(frame(1000).sample(frac=1, random_state=7), DataConfig())
    for name in ("train", "val", "test"):
        assert small[name]["uid"].tolist() == again[name]["uid"].tolist()
        assert set(small[name]["uid"]) <= set(big[name]["uid"])


def test_other_seed_gives_other_split_and_train_size_samples_train_only():
    a = split_frame(frame(2000), DataConfig(seed=1, train_size=300))
    b = split_frame(frame(2000), DataConfig(seed=2, train_size=300))
    assert len(a["train"]) == 300 and len(a["test"]) > 150
    assert set(a["test"]["uid"]) != set(b["test"]["uid"])
    assert split_frame(frame(2000), DataConfig(seed=1, train_size=300))["train"].equals(a["train"])
