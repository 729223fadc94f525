"""Clean: what cleaning does to real text, the vectorised path agreeing with clean_text, filters and duplicates."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from desctune.config import DataConfig
from desctune.data import clean as clean_mod
from desctune.data.clean import clean_column, clean_file, clean_text
from desctune.data.ingest import ingest_file
from desctune.data.records import EXCERPT_CHARS

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "amazon_titles_sample.jsonl"
ENTITY = re.compile(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z]+\d*);")
TAG = re.compile(r"</?[A-Za-z][^<>]*>")
MOJIBAKE = re.compile(clean_mod._MOJIBAKE)


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("Judith Kerr&#8217;s best&#8211;selling", "Judith Kerr\u2019s best\u2013selling"),
        ("it&#x2019;s &mdash; &copy; 2001&#160;ok", "it\u2019s \u2014 \u00a9 2001 ok"),
        ("double &amp;#8217; and &amp;quot;q&amp;quot;", "double \u2019 and \"q\""),
        ("cp1252 ref &#x92;s and &#151;", "cp1252 ref \u2019s and \u2014"),
        ("A&amp;E and R&D stay", "A&E and R&D stay"),
        ("line<br>break<BR/>and <p class='x'>para</p> &lt;b&gt;bold&lt;/b&gt;", "line break and para bold"),
        ("x < 5 and y > 3", "x < 5 and y > 3"),
        ("caf\u00c3\u00a9 \u00e2\u20ac\u201cnice\u00e2\u20ac\u009d", "caf\u00e9 \u2013nice\u201d"),
        ("cafe\u0301 decomposed", "caf\u00e9 decomposed"),
        ("ctrl\x00\x07 chars\u200b zero\ufeffwidth", "ctrl chars zerowidth"),
        ("  tabs\tand\n\nnewlines\r\n  runs\u00a0\u3000 ", "tabs and newlines runs"),
        ("A great read.--This text refers to thePaperbackedition.", "A great read."),
        ("Intro. --This text refers to an out of print or unavailable edition of this title. More.", "Intro. More."),
        ("--This text refers to theHardcoveredition.", ""),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned
    assert clean_column(pa.array([raw])).to_pylist() == [cleaned]


def test_stubs_kept_when_turned_off():
    s = "A great read.--This text refers to thePaperbackedition."
    assert clean_text(s, strip_stubs=False) == s
    assert clean_column(pa.array([s]), strip_stubs=False).to_pylist() == [s]


def _variants(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """Real texts with the characters that steer the fast and slow paths spliced in at random places."""
    rng = random.Random(seed)
    bits = [" ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\u00a0", "\u2003", "\u3000", "&amp;",
            "&#8217;", "<br>", "\x00", "\x7f", "\u200b", "\u00c3\u00a9", "e\u0301", "\u00e9", "--This text refers to "
            "thePaperbackedition.", "This text refers to nothing", "&", "<", "\ufb01",
            # what NFC changes: a combining mark after a letter, marks out of order, Hangul jamo, singletons
            "\u0327", "\u0301\u0327", "\u1100\u1161\u11a8", "\u2126", "\u212b", "\uf900", "\u0344", "\U0001d15e",
            # mojibake: a C1 control, a UTF-8 punctuation mark and a no-break space read as cp1252
            "\x9d", "\u00e2\u20ac\u2122", "\u00c2\u00a0", "\u00c3\u0161"]
    out = []
    for _ in range(n):
        s = rng.choice(texts)
        for _ in range(rng.randint(0, 4)):
            i = rng.randint(0, len(s))
            s = s[:i] + rng.choice(bits) + s[i:]
        out.append(s)
    return out


def test_vectorised_path_equals_clean_text():
    texts = []
    for line in SAMPLE.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        texts += [r["title"], r["content"]]
    cases = texts + _variants(texts, 3000) + ["", " ", "\t", "a", " a ", "&", "<"]
    got = clean_column(pa.array(cases)).to_pylist()
    want = [clean_text(s) for s in cases]
    assert [i for i, (g, w) in enumerate(zip(got, want)) if g != w] == []


def test_sample_has_no_entities_tags_or_mojibake_after_cleaning(tmp_path):
    raw = ingest_file(DataConfig(path=str(SAMPLE)), tmp_path / "ingest")
    out = clean_file(raw, DataConfig(path=str(SAMPLE), filters=False), tmp_path / "clean")
    contents = pq.read_table(out["path"]).column("content").to_pylist()
    before = [json.loads(x)["content"] for x in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert sum(bool(ENTITY.search(c)) for c in before) > 50
    assert sum(bool(ENTITY.search(c)) for c in contents) == 0
    assert sum(bool(TAG.search(c)) for c in contents) == 0
    assert sum(bool(MOJIBAKE.search(c)) for c in contents) == 0
    assert sum("This text refers" in c for c in before) > 100
    assert sum("This text refers" in c for c in contents) == 0


def _raw(tmp_path: Path, rows: list[dict]) -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return ingest_file(DataConfig(path=str(src)), tmp_path / "ingest")


LONG = "A sturdy, well made product description that is long enough to pass the content filter easily. " * 2


def test_filters_duplicates_and_every_reason(tmp_path):
    rows = [
        {"uid": "a", "title": "A proper title", "content": LONG},
        {"uid": "b", "title": "<br>", "content": LONG + "b"},
        {"uid": "c", "title": "Another title", "content": "--This text refers to thePaperbackedition."},
        {"uid": "d", "title": "Short", "content": LONG + "d"},
        {"uid": "e", "title": "Title for short content", "content": "too short"},
        {"uid": "a", "title": "Same uid again", "content": LONG + "a2"},
        {"uid": "f", "title": "A proper  title", "content": LONG.replace(" ", "  ")},
        {"uid": "g", "title": "Fine title", "content": None},
    ]
    raw = _raw(tmp_path, rows)
    out = clean_file(raw, DataConfig(), tmp_path / "clean")
    kept = pq.read_table(out["path"]).to_pylist()
    rejects = {r["uid"]: r for r in pq.read_table(out["rejects_path"]).to_pylist()}
    assert [r["uid"] for r in kept] == ["a"]
    assert {u: r["reason"] for u, r in rejects.items()} == {
        "g": "missing_content", "b": "empty_title", "c": "empty_content", "d": "title_too_short",
        "e": "content_too_short", "a": "duplicate_uid", "f": "duplicate_record",
    }
    assert set(clean_mod.REASONS) - {"review_blurb"} <= set(out["by_reason"])  # blurbs: their own test below
    assert rejects["e"]["line"] == 5 and rejects["e"]["excerpt"].startswith("Title for short content | too short")
    # Excerpts are of the raw texts, for a duplicate that cleaning left as it was ("a") and one it changed ("f").
    assert rejects["a"]["excerpt"] == f"Same uid again | {LONG}a2"[:EXCERPT_CHARS]
    assert rejects["f"]["excerpt"] == f"A proper  title | {LONG.replace(' ', '  ')}"[:EXCERPT_CHARS]
    assert out["duplicates"] == 2 and out["kept"] + out["rejected"] == len(rows)

    loose = clean_file(raw, DataConfig(filters=False), tmp_path / "loose")
    assert loose["kept"] == 3 and "title_too_short" not in loose["by_reason"]
    assert loose["by_reason"]["empty_content"] == 1


def test_batches_and_threads_keep_order_and_first_duplicate(tmp_path, monkeypatch):
    monkeypatch.setattr(clean_mod, "BATCH_ROWS", 7)
    # A third of the contents have an entity, so some duplicates were changed by cleaning and some were not.
    rows = [{"uid": f"u{i % 40}", "title": f"Title number {i % 25}",
             "content": f"{LONG}{'&amp; ' * (i % 25 % 3 == 0)}{i % 25}"} for i in range(60)]
    out = clean_file(_raw(tmp_path, rows), DataConfig(), tmp_path / "clean")
    kept = pq.read_table(out["path"]).column("uid").to_pylist()
    assert kept == [f"u{i}" for i in range(25)]
    assert out["by_reason"] == {"duplicate_record": 15, "duplicate_uid": 20}
    rejects = pq.read_table(out["rejects_path"]).to_pylist()
    assert [r["excerpt"] for r in rejects] == [
        f"{rows[r['line'] - 1]['title']} | {rows[r['line'] - 1]['content']}"[:EXCERPT_CHARS] for r in rejects]


@pytest.mark.parametrize("content, blurb", [
    ("'Startlingly good...tense...ingenious' Sunday Express 'A master of suspense' The Times", True),
    ("Praise for Bernard Cornwell's Sharpe novels: 'Sharpe is a hero for our time.' Daily Mirror", True),
    ('"An instant animal classic." --Time "Funny and wise." --People', True),
    ("Another first rate page-turner with real power' Daily Express 'Open a Cornwell and you are hooked' Mail "
     "'Superb' Observer", True),
    ("A sturdy 12 oz ceramic mug with a glazed finish; dishwasher and microwave safe. Holds a full cup of coffee.",
     False),
    ("In this essay Wilde writes that 'all art is quite useless', and the book follows that idea through the "
     "decorative arts of his day, chapter by chapter, with many plates.", False),
])
def test_review_blurbs_are_told_from_descriptions(content, blurb):
    assert clean_mod.is_blurb(content) is blurb


def test_reject_blurbs_quarantines_them_with_a_reason_and_counts_them(tmp_path):
    data = DataConfig(path=str(SAMPLE), reject_blurbs=True)
    out = clean_file(ingest_file(data, tmp_path), data, tmp_path)
    assert out["by_reason"]["review_blurb"] == 201 and out["kept"] == 238
    rejects = pq.read_table(out["rejects_path"]).to_pandas()
    assert (rejects["reason"] == "review_blurb").sum() == 201
    off = clean_file(ingest_file(DataConfig(path=str(SAMPLE)), tmp_path / "off"), DataConfig(path=str(SAMPLE)),
                     tmp_path / "off")
    assert "review_blurb" not in off["by_reason"] and off["kept"] == 438


def _reference_dedup(rows: list[tuple[str, str, str]]) -> list[str | None]:
    """The rule, spelled out with sets of strings: first wins; duplicate uid first, then duplicate (title, content)."""
    uids, pairs, out = set(), set(), []
    for uid, title, content in rows:
        if uid in uids:
            out.append("duplicate_uid")
        elif (title, content) in pairs:
            out.append("duplicate_record")
        else:
            out.append(None)
            uids.add(uid)
            pairs.add((title, content))
    return out


def test_hashed_dedup_equals_the_rule_with_sets_of_strings():
    rng = random.Random(5)
    rows = [(f"u{rng.randrange(300)}", f"t{rng.randrange(40)}", f"c{rng.randrange(40)}") for _ in range(3000)]
    dedup, got = clean_mod._Dedup(), []
    for start in range(0, len(rows), 257):  # batches, so repeats fall both within one batch and across batches
        chunk = rows[start:start + 257]
        uid, title, content = (pa.array(["pad", *(r[k] for r in chunk)]).slice(1) for k in range(3))  # offset > 0
        got += dedup.reasons(clean_mod._hashes(uid), clean_mod._pair_hashes(title, content))
    assert got == _reference_dedup(rows)
    assert {"duplicate_uid", "duplicate_record", None} == set(got)


def test_hash_set_answers_as_a_set_of_ints():
    import numpy as np

    rng = np.random.default_rng(7)
    edges = np.array([0, 1, 2**63, 2**64 - 1], np.uint64)
    seen, ours = set(), clean_mod._HashSet()
    for _ in range(20):
        h = np.concatenate([rng.integers(0, 2**64, 500, np.uint64, endpoint=False) % np.uint64(5000), edges[:2]])
        assert ours.contains(h).tolist() == [int(x) in seen for x in h]
        ours.add(h[: len(h) // 2])
        seen.update(int(x) for x in h[: len(h) // 2])
        edges = edges[::-1]
    assert ours.contains(np.array([2**64 - 1, 2**63], np.uint64)).tolist() == [2**64 - 1 in seen, 2**63 in seen]


def test_output_hashes_are_those_of_the_files_written(tmp_path):
    from desctune.files import file_sha256

    raw = ingest_file(DataConfig(path=str(SAMPLE)), tmp_path / "ingest")
    out = clean_file(raw, DataConfig(), tmp_path / "clean")
    for result in (raw, out):
        assert result["sha256"] == file_sha256(result["path"])
        assert result["rejects_sha256"] == file_sha256(result["rejects_path"])


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        # ftfy fixes each line on its own: a line whose only sign is the lone Â kept it
        ("It\u00e2\u20ac\u2122s great.\n10\u00c2 cm wide", "It\u2019s great. 10 cm wide"),
        ("It\u00e2\u20ac\u2122s great.\nSizes 10\u00c2 cm, 12\u00c2", "It\u2019s great. Sizes 10 cm, 12"),
        ("It\u00e2\u20ac\u2122s great.\nIt is voil\u00c3  the end", "It\u2019s great. It is voil\u00e0 the end"),
        ("Caf\u00c3\u00a9 corner.\nNa\u00c3\u00afve 5\u00c2 kg", "Caf\u00e9 corner. Na\u00efve 5 kg"),
        # no other sign of mis-decoding, or Â/Ã inside a word: left as it is
        ("Size 10\u00c2 cm", "Size 10\u00c2 cm"),
        ("S\u00e3o Paulo \u00c2 coisa", "S\u00e3o Paulo \u00c2 coisa"),
        ("IRM\u00c3\u2026 e CH\u00c2TEAU \u00c2", "IRM\u00c3\u2026 e CH\u00c2TEAU \u00c2"),
        ("It\u00e2\u20ac\u2122s the CH\u00c2TEAU.\nS\u00c3O PAULO", "It\u2019s the CH\u00c2TEAU. S\u00c3O PAULO"),
    ],
)
def test_mojibake_remnants_that_ftfy_leaves_are_repaired_only_in_mis_decoded_text(raw, cleaned):
    assert clean_text(raw) == cleaned
    assert clean_column(pa.array([raw])).to_pylist() == [cleaned]


def test_hashes_are_xxh3_of_the_utf8_bytes_whatever_the_array_offset():
    import xxhash

    texts = ["", "caf\u00e9", "\u2019s", "plain", "x" * 5000]
    arr = pa.array(["skip", *texts]).slice(1)
    assert clean_mod._hashes(arr).tolist() == [xxhash.xxh3_64_intdigest(t.encode()) for t in texts]
    assert clean_mod._hashes(pa.chunked_array([arr.slice(0, 2), arr.slice(2)])).tolist() == clean_mod._hashes(
        arr).tolist()


def test_byte_tests_pick_the_rows_their_substring_would():
    texts = ["a & b", "none", "x<y", "", "caf\u00e9", "e\u0301", "\u2019", "ends with &", "This text refers", "T",
             "\u1100\u1161", "\u2126", "Caf\u00c3\u00a9", "\x9d", "\u00c3 x", "Th", "a\x00", "\x1b", "\x7f", "\xad",
             "tab\tnew\nline\x1c", "\u200b", "\u200e", "\u2060", "\u206f", "\ufeff", "\ufffc", "\ufffd", "\U0001f600"]
    arr = pa.array(["<&", *texts]).slice(1)
    rows = lambda find: clean_mod._rows_where(arr, find).tolist()  # noqa: E731
    assert rows(clean_mod._markup_positions) == ["&" in t or "<" in t for t in texts]
    assert rows(clean_mod._stub_positions) == [clean_mod.STUB_MARK in t for t in texts]
    unstable = clean_mod._nfc_unstable()
    assert rows(clean_mod._nfc_positions) == [any(unstable[ord(c)] for c in t) for t in texts]
    assert rows(clean_mod._mojibake_positions) == [bool(clean_mod._MOJIBAKE_RE.search(t)) for t in texts]
    assert rows(clean_mod._control_positions) == [bool(clean_mod._CONTROL_RE.search(t)) for t in texts]


def test_nfc_table_has_every_character_nfc_may_change():
    """A text none of whose characters is in the table is NFC: each of the others is NFC alone, starts no
    reordering and composes with none before it. Checked on every code point, so the scan's range misses none."""
    import unicodedata

    table = clean_mod._nfc_unstable()
    seconds = set()
    for c in range(0x110000):
        ch = chr(c)
        mapping = unicodedata.decomposition(ch)
        if mapping and not mapping.startswith("<") and len(mapping.split()) == 2:
            seconds.add(int(mapping.split()[1], 16))
        if not table[c]:
            assert unicodedata.combining(ch) == 0 and unicodedata.is_normalized("NFC", ch), hex(c)
    assert all(table[c] for c in seconds)
    assert not table[:0x300].any()
    firsts = [chr(c) for c in range(0x20, 0x3000) if not table[c]]
    others = [chr(c) for c in range(0x300, 0x110000, 7) if not table[c]]
    assert all(unicodedata.is_normalized("NFC", a + b) for a in firsts[::3] for b in others[::50])


def test_control_byte_test_finds_exactly_the_characters_of_the_regex_on_every_code_point():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    arr = pa.array(chars)
    found = clean_mod._rows_where(arr, clean_mod._control_positions)
    assert [c for c, f in zip(chars, found) if f] == [c for c in chars if clean_mod._CONTROL_RE.search(c)]
    assert found.tolist() == pc.match_substring_regex(arr, clean_mod._CONTROL).to_pylist()


def test_cleaning_in_small_batches_gives_the_same_output_as_in_one(tmp_path, monkeypatch):
    """Batches of 250 rows cleaned two at a time on threads: same kept rows, rejects and order as one batch, with
    duplicates across batches found (the first one is kept) and every reason."""
    rng = random.Random(3)
    rows = []
    for i in range(3000):
        n = rng.randrange(400)
        title = rng.choice([f"Title &amp; number {n}", f"T{n}", f"Caf\u00c3\u00a9 title {n}", f"Title  {n}<br>"])
        content = rng.choice([LONG + f" {n}", "short", f"{LONG}&#8217;s --This text refers to thePaperbackedition. {n}",
                              f"cafe\u0301 {LONG} {n}"])
        rows.append({"uid": f"u{rng.randrange(2500)}", "title": title, "content": content})
    raw = _raw(tmp_path, rows)
    table = pq.read_table(raw["path"])
    pq.write_table(table, raw["path"], row_group_size=250)  # 12 row groups
    one = clean_file(raw, DataConfig(), tmp_path / "one")
    monkeypatch.setattr(clean_mod, "BATCH_ROWS", 250)
    two = clean_file(raw, DataConfig(), tmp_path / "two")
    for key in ("path", "rejects_path"):
        assert pq.read_table(two[key]).equals(pq.read_table(one[key]))
    assert two["by_reason"] == one["by_reason"] and two["kept"] == one["kept"]
    assert {"duplicate_uid", "duplicate_record", "title_too_short", "content_too_short"} <= set(two["by_reason"])
