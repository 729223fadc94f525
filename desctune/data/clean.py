"""Clean: normalise titles and contents, drop unusable and duplicate records, quarantine every dropped one.

`clean_text` is the reference cleaner for one string: HTML entities (named, numeric, hex, double-escaped), tags and
<br>, mojibake (ftfy, then the remnants it leaves where a text shows mis-decoding), NFC, control and zero-width
characters, boilerplate stubs, whitespace runs. `clean_column` gives the same result for a whole Arrow column: rows
that are plain ASCII with no '&', '<', control character or extra whitespace (most of trn.json) are left as they are,
and each repair of `clean_text` runs only on the rows a cheap test (RE2, or numpy over the bytes) picks for it.
`clean_file` streams raw.parquet a batch at a time, two batches in flight on threads (Arrow's kernels let go of the
GIL); it keeps the file's order, finds duplicates by 64-bit hashes of the cleaned texts, and writes. Memory stays
bounded by the batches in flight plus 40-70 bytes a kept record for the hashes.
"""

from __future__ import annotations

import functools
import html
import logging
import re
import unicodedata
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import ftfy
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
from pandas._libs.hashtable import UInt64HashTable

from desctune.config import DataConfig
from desctune.data.ingest import REJECT_PARQUET
from desctune.data.records import EXCERPT_CHARS, REJECT_SCHEMA
from desctune.files import HashingSink, atomic_path, start_stage
from desctune.stages import stage_folder

log = logging.getLogger(__name__)

CLEAN_SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
BATCH_ROWS = 65_536
# clean.parquet: zstd, no dictionary (titles and contents are nearly all distinct), statistics only on the uid.
CLEAN_PARQUET = {"compression": "zstd", "use_dictionary": False, "write_statistics": ["uid"]}

ENTITY = r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});"
TAG = r"</?[A-Za-z][^<>]{0,1000}>"
# Python's str.split() whitespace, spelled out so Python's re and pyarrow's RE2 agree on it.
_WS_CODES = [(0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
             (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
_WS_RE2 = "[" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in _WS_CODES) + "]"
_WS_NOT_SPACE_RE2 = _WS_RE2.replace("\\x{1c}-\\x{20}", "\\x{1c}-\\x{1f}")
_WS_PY = "[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in _WS_CODES) + "]"
STUB = r"-*{ws}*This text refers to (?:an?|the)[^.]{{0,80}}?edition(?: of this title)?\."
STUB_MARK = "This text refers"
_STUB_RE = re.compile(STUB.format(ws=_WS_PY))
_STUB_RE2 = STUB.format(ws=_WS_RE2)
_WS_RUN_RE2 = f"{_WS_RE2}{{2,}}|{_WS_NOT_SPACE_RE2}"
_ENTITY_RE, _TAG_RE = re.compile(ENTITY), re.compile(TAG)
# Control and invisible format characters, deleted (tab, newline and the like are whitespace, handled later).
_CONTROL_CODES = [(0x00, 0x08), (0x0E, 0x1B), (0x7F, 0x84), (0x86, 0x9F), (0xAD, 0xAD), (0x200B, 0x200D),
                  (0x2060, 0x2060), (0x206A, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFC)]
_CONTROL = "[" + "".join(f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in _CONTROL_CODES) + "]"
_CONTROL_RE = re.compile("[" + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in _CONTROL_CODES) + "]")
_CP1252_HIGH = bytes(range(0x80, 0xA0)).decode("cp1252", "ignore")
# UTF-8 read as Latin-1/cp1252: a lead byte followed by a continuation byte, plus stray C1 controls.
_MOJIBAKE = f"[\xc2-\xf4][\x80-\xbf{_CP1252_HIGH}]|[\x80-\x9f]"
_MOJIBAKE_RE = re.compile(_MOJIBAKE)
# Signs that a text was mis-decoded, strong enough that the remnants below are repaired in it: a UTF-8 punctuation
# mark read as cp1252 (â€™, â€œ, â€“ …), an accented letter or Latin-1 sign read the same way (Ã©, Ã¨, Â°, Â©, Â +
# no-break space).
_SIGNS_RE = re.compile(f"\u00e2\u20ac[\x80-\xbf{_CP1252_HIGH}]|[\u00c2\u00c3][\xa0-\xbf]")
# What ftfy leaves, as it fixes each line on its own and only where the line looks mis-decoded: a lone Â before
# whitespace or at the end (a no-break space whose second byte had already become a plain space), Ã + whitespace
# after a lowercase letter (à the same way: "voilÃ  " is "voilà "), and two-character UTF-8 sequences of Â or Ã.
_LONE_A_CIRC_RE = re.compile("\u00c2(?=\\s|$)")
_A_GRAVE_RE = re.compile("(?<=[a-z\u00df-\u00ff])\u00c3(?=\\s)")
_PAIR_RE = re.compile(f"[\u00c2\u00c3][\x80-\xbf{_CP1252_HIGH}]")
# ASCII rows that clean_text would change: markup, controls, a stub, whitespace other than single inner spaces.
_SPECIAL_RE2 = f"[&<]|{_CONTROL}|{STUB_MARK}|[\\t\\n\\x0b\\f\\r\\x1c-\\x1f]|  |^ | $"
_FTFY = ftfy.TextFixerConfig(unescape_html=False, uncurl_quotes=False, explain=False)

# The data settings that change what clean writes.
CLEAN_FIELDS = ("filters", "min_title_chars", "min_content_chars", "strip_stubs", "reject_blurbs")

REASONS = {
    "empty_title": "the title is empty after cleaning",
    "empty_content": "the content is empty after cleaning (for example only a boilerplate stub)",
    "title_too_short": "the title is shorter than data.min_title_chars (length filter)",
    "content_too_short": "the content is shorter than data.min_content_chars (length filter)",
    "duplicate_uid": "an earlier record has the same uid",
    "duplicate_record": "an earlier record has the same title and content",
    "review_blurb": "the content is press praise (quotations with their sources), not a description "
    "(data.reject_blurbs)",
}

_QUOTES = "'\"‘’“”"
# A lead-in label: "Praise for X:", "Reviews for 'Damaged':", "Acclaim for Y".
_BLURB_LABEL = re.compile(
    r"^\W{0,3}(?:advance praise|praise|(?:critical )?acclaim|reviews?)(?: (?:for|of)\b[^'\"‘“]{0,80})?\W{0,3}", re.I)
_OPENS_QUOTED = re.compile(rf"^\W{{0,3}}[{_QUOTES}]")
# The end of a quotation and its source: "...' Daily Mail", '..." --Time', "...’SFX".
_ATTRIBUTION = re.compile(rf"(?:[.!?…][{_QUOTES}]|[^\s{_QUOTES}][{_QUOTES}])\s*(?:-{{1,2}}|—|–)?\s*[A-Z]")


def _markup(s: str) -> str:
    """Entities (repeatedly, for double-escaped text: '&amp;#8217;' -> '&#8217;' -> '’'), then tags."""
    for _ in range(3):
        if "&" not in s:
            break
        decoded = html.unescape(s)
        if decoded == s:
            break
        s = decoded
    return _TAG_RE.sub(" ", s) if "<" in s else s


def _undo_pair(m: re.Match) -> str:
    pair = m.group()
    try:
        return pair.encode("cp1252").decode("utf-8")
    except UnicodeError:
        try:
            return pair.encode("latin-1").decode("utf-8")
        except UnicodeError:
            return pair


def repair_remnants(s: str) -> str:
    """Repair what ftfy left of mis-decoded UTF-8 in a text known to be mis-decoded: a lone Â before whitespace or at
    the end is dropped, Ã + whitespace after a lowercase letter becomes à, and Ã©-style pairs are decoded. Â or Ã
    inside a word (CHÂTEAU, SÃO) is left as it is."""
    s = _LONE_A_CIRC_RE.sub("", s)
    s = _A_GRAVE_RE.sub("\u00e0", s)
    return _PAIR_RE.sub(_undo_pair, s)


def _mojibake(s: str) -> str:
    """ftfy, then the remnants it leaves, repaired only where the text shows mis-decoding (ftfy changed it, or it
    holds a sign such as â€™ or Ã©): a text whose only oddity is an Â before a space is left alone."""
    fixed = ftfy.fix_text(s, _FTFY)
    if ("\u00c2" in fixed or "\u00c3" in fixed) and (fixed != s or _SIGNS_RE.search(s)):
        fixed = repair_remnants(fixed)
    return fixed


def clean_text(s: str, strip_stubs: bool = True) -> str:
    """The cleaned form of one title or content string (the reference for `clean_column`)."""
    s = _markup(s)
    if not s.isascii():
        if _MOJIBAKE_RE.search(s):
            s = _mojibake(s)
        s = unicodedata.normalize("NFC", _CONTROL_RE.sub("", s))
    else:
        s = _CONTROL_RE.sub("", s)
    if strip_stubs and STUB_MARK in s:
        s = _STUB_RE.sub(" ", s)
    return " ".join(s.split())


def is_blurb(content: str) -> bool:
    """True for a cleaned content that is press praise (quotations with their sources: "'Startlingly good' Sunday
    Express ...") rather than a description: a praise label with an attribution, a content that opens with a quotation
    that is attributed or closed at the end, or at least three attributions at one per 50 words or denser. It misses
    praise without quote marks, and leaves alone reviews that only quote the book."""
    s = content.strip()
    attributions = len(_ATTRIBUTION.findall(s))
    if _BLURB_LABEL.match(s) and attributions:
        return True
    if _OPENS_QUOTED.match(s) and (attributions >= 1 or s[-1:] in _QUOTES):
        return True
    return attributions >= 3 and len(s.split()) <= 50 * attributions


def _apply(arr: pa.Array, mask: pa.Array | np.ndarray, fn) -> pa.Array:
    """Replace the masked rows of `arr` with fn(those rows); fn takes and returns an Arrow array."""
    if isinstance(mask, np.ndarray):
        if not mask.any():
            return arr
        mask = pa.array(mask)
    elif not pc.any(mask).as_py():
        return arr
    return pc.replace_with_mask(arr, mask, fn(pc.filter(arr, mask)))


def _strings(a: pa.Array):
    """Python strings of an Arrow array (to_numpy: cheaper than to_pylist)."""
    return a.to_numpy(zero_copy_only=False)


def _py(fn):
    return lambda a: pa.array([fn(s) for s in _strings(a)], pa.string())


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


# Row tests on the bytes. Each finder takes the UTF-8 bytes of all rows of an array (a uint8 numpy array over its data
# buffer) and returns the positions where what it looks for begins; `_rows_where` turns them into rows. A comparison
# or two over the buffer finds the few candidates, which are then tested further, so a repair runs on the rows that
# may need it instead of on every row a broader test picks. A match that would run from one row into the next can
# mark the first row too: every repair leaves a row that has nothing to repair as it is.


def _offsets(arr: pa.Array) -> tuple[np.ndarray, pa.Buffer | None]:
    """The row end offsets (n + 1) and the data buffer of a string array."""
    _, offsets, data = arr.buffers()
    width = np.dtype(np.int64 if pa.types.is_large_string(arr.type) else np.int32)
    return np.frombuffer(offsets, width, len(arr) + 1, arr.offset * width.itemsize), data


def _rows_at(ends: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[np.searchsorted(ends, positions, side="right") - 1] = True
    return mask


def _rows_where(arr: pa.Array, find) -> np.ndarray:
    """Rows (a numpy mask) where `find`, on the bytes of all rows, finds something."""
    ends, data = _offsets(arr)
    if data is None or len(arr) == 0 or ends[-1] == ends[0]:
        return np.zeros(len(arr), bool)
    raw = np.frombuffer(data, np.uint8, int(ends[-1] - ends[0]), int(ends[0]))
    return _rows_at(ends, find(raw) + ends[0], len(arr))


def _followed_by(raw: np.ndarray, starts: np.ndarray, *nexts: np.ndarray) -> np.ndarray:
    """The `starts` whose following bytes are in the given 256-entry tables, one table a byte."""
    for j, table in enumerate(nexts, 1):
        starts = starts[starts + j < len(raw)]
        starts = starts[table[raw[starts + j]]]
    return starts


def _table(*values: int) -> np.ndarray:
    t = np.zeros(256, bool)
    t[list(values)] = True
    return t


def _needle_finder(needle: bytes):
    """A finder for one byte string (two bytes or more): its first two bytes compared over the whole buffer, then the
    few candidates narrowed a byte at a time."""
    def find(raw: np.ndarray) -> np.ndarray:
        n = len(raw) - len(needle) + 1
        if n <= 0:
            return np.empty(0, np.int64)
        starts = np.flatnonzero((raw[:n] == needle[0]) & (raw[1 : n + 1] == needle[1]))
        for j in range(2, len(needle)):
            starts = starts[raw[starts + j] == needle[j]]
        return starts

    return find


def _markup_positions(raw: np.ndarray) -> np.ndarray:
    return np.flatnonzero((raw == ord("&")) | (raw == ord("<")))


@functools.cache
def _nfc_unstable() -> np.ndarray:
    """A table over all code points: True where a character can change under NFC, alone or beside another: it is not
    NFC by itself (NFC_Quick_Check=No), has a non-zero combining class (canonical reordering), or is the second of a
    canonical pair (it may compose with the one before: the Quick_Check=Maybe ones, and a few more), plus the Hangul
    vowel and trailing jamo, which compose by rule. A text with none of them is NFC (the quick check says yes).
    Nothing below U+0300 and nothing assigned from U+30000 on is one of them (a test checks every code point)."""
    table = np.zeros(0x110000, bool)
    for c in range(0x300, 0x30000):
        ch = chr(c)
        if unicodedata.combining(ch) or not unicodedata.is_normalized("NFC", ch):
            table[c] = True
        mapping = unicodedata.decomposition(ch)
        if mapping and not mapping.startswith("<") and len(mapping.split()) == 2:
            table[int(mapping.split()[1], 16)] = True
    table[0x1161:0x1176] = table[0x11A8:0x11C3] = True
    return table


def _code_points(raw: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """The code points of the characters whose lead bytes are at `starts` (the text is valid UTF-8, so every lead
    byte has its continuation bytes)."""
    lead = raw[starts].astype(np.int64)
    width = 1 + (lead >= 0xC0) + (lead >= 0xE0) + (lead >= 0xF0)
    cp = lead & np.select([width == 1, width == 2, width == 3], [0x7F, 0x1F, 0x0F], 0x07)
    for j in (1, 2, 3):
        cp = np.where(width > j, (cp << 6) | (raw[np.minimum(starts + j, len(raw) - 1)] & 0x3F), cp)
    return cp


def _nfc_positions(raw: np.ndarray) -> np.ndarray:
    """Lead bytes of characters NFC may change (`_nfc_unstable`), decoded only from lead byte 0xCC on (U+0300)."""
    starts = np.flatnonzero(raw >= 0xCC)
    return starts[_nfc_unstable()[_code_points(raw, starts)]]


@functools.cache
def _control_table() -> np.ndarray:
    """A table over the code points up to one past the last of _CONTROL: True for its characters."""
    table = np.zeros(_CONTROL_CODES[-1][1] + 2, bool)
    for a, b in _CONTROL_CODES:
        table[a : b + 1] = True
    return table


# The bytes that start a character of _CONTROL: an ASCII control, or the lead byte of one of the others.
_CONTROL_LEADS = sorted({chr(c).encode()[0] for a, b in _CONTROL_CODES for c in range(a, b + 1)})


def _control_positions(raw: np.ndarray) -> np.ndarray:
    """Lead bytes of _CONTROL characters: the bytes below 0x20 or equal to a lead byte of one, decoded."""
    maybe = raw < 0x20
    for lead in _CONTROL_LEADS:
        if lead >= 0x20:
            maybe |= raw == lead
    starts = np.flatnonzero(maybe)
    table = _control_table()
    return starts[table[np.minimum(_code_points(raw, starts), len(table) - 1)]]


# Where mojibake may be (the _MOJIBAKE regex then decides, on those rows only): a C1 control (C2 80-9F), or one of
# Â..ô (C3 82-B4) followed by a byte that starts one of the characters the regex allows second (U+0080-U+00BF, and
# what cp1252 puts at 0x80-0x9F: € ‚ ƒ „ … † ‡ ˆ ‰ Š ‹ Œ Ž ‘ ’ “ ” • – — ˜ ™ š › œ ž Ÿ).
_C1_SECOND = _table(*range(0x80, 0xA0))
_MOJI_LETTER_SECOND = _table(*range(0x82, 0xB5))
_MOJI_NEXT_LEAD = _table(*{c.encode()[0] for c in "".join(map(chr, range(0x80, 0xC0))) + _CP1252_HIGH})


def _mojibake_positions(raw: np.ndarray) -> np.ndarray:
    c1 = _followed_by(raw, np.flatnonzero(raw == 0xC2), _C1_SECOND)
    pair = _followed_by(raw, np.flatnonzero(raw == 0xC3), _MOJI_LETTER_SECOND, _MOJI_NEXT_LEAD)
    return np.concatenate([c1, pair])


_stub_positions = _needle_finder(STUB_MARK.encode())


def _matching(arr: pa.Array, rows: np.ndarray, pattern: str) -> np.ndarray:
    """The `rows` (a numpy mask) whose text matches the RE2 `pattern`, which is run on those rows only."""
    idx = np.flatnonzero(rows)
    out = np.zeros(len(arr), bool)
    if len(idx):
        out[idx[pc.match_substring_regex(arr.take(idx), pattern).to_numpy(zero_copy_only=False)]] = True
    return out


def _clean_special(arr: pa.Array, strip_stubs: bool) -> pa.Array:
    # Cheap tests pick the rows each repair looks at: markup needs '&' or '<', mojibake a C1 control or a Latin-1
    # letter before a character that may be the rest of its UTF-8 bytes, NFC a character that may change under it, a
    # stub its marker.
    arr = _apply(arr, _rows_where(arr, _markup_positions), _py(_markup))
    arr = _apply(arr, _matching(arr, _rows_where(arr, _mojibake_positions), _MOJIBAKE), _py(_mojibake))
    arr = _apply(arr, _rows_where(arr, _control_positions), lambda a: pc.replace_substring_regex(a, _CONTROL, ""))
    arr = _apply(arr, _rows_where(arr, _nfc_positions), _py(_nfc))
    if strip_stubs:
        arr = _apply(arr, _rows_where(arr, _stub_positions), lambda a: pc.replace_substring_regex(a, _STUB_RE2, " "))
    arr = pc.replace_substring_regex(arr, _WS_RUN_RE2, " ")
    return pc.ascii_trim(arr, " ")


def clean_column(arr: pa.Array, strip_stubs: bool = True) -> pa.Array:
    """`clean_text` for every string of an Arrow array: RE2 kernels, with Python only for entities, tags, mojibake
    and NFC, each on the rows that may need it.

    One RE2 pass finds the rows `clean_text` would change at all (ASCII rows with no markup, control character,
    stub, whitespace run or edge whitespace stay as they are); only those go through the cleaning passes.
    """
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if len(arr) == 0:
        return arr
    special = pc.or_(pc.invert(pc.string_is_ascii(arr)), pc.match_substring_regex(arr, _SPECIAL_RE2))
    return _apply(arr, special, lambda a: _clean_special(a, strip_stubs))


def _excerpt(title: pa.Array, content: pa.Array, where: pa.Array | None = None) -> pa.Array:
    """The start of "title | content", each cut first so that no whole text is copied to make it; with a mask
    `where`, only for those rows (null for the others)."""
    if where is not None:
        return pc.replace_with_mask(pa.nulls(len(title), pa.string()), where,
                                    _excerpt(title.filter(where), content.filter(where)))
    title, content = (pc.utf8_slice_codeunits(a, 0, EXCERPT_CHARS) for a in (title, content))
    return pc.utf8_slice_codeunits(pc.binary_join_element_wise(title, content, " | "), 0, EXCERPT_CHARS)


class _HashSet:
    """A set of 64-bit hashes, membership tested and members added for a whole array at a time: pandas' open-addressing
    hash table over uint64. `pandas._libs.hashtable` is not public API: test_clean checks it against a set of ints."""

    def __init__(self) -> None:
        self._table = UInt64HashTable()

    def contains(self, h: np.ndarray) -> np.ndarray:
        return self._table.lookup(h) >= 0

    def add(self, h: np.ndarray) -> None:
        if len(h):
            self._table.map_locations(h)


def _repeated(h: np.ndarray) -> np.ndarray:
    """Rows whose hash occurs more than once in `h`."""
    s = np.sort(h)
    return np.isin(h, s[1:][s[1:] == s[:-1]])


def _hashes(a: pa.Array) -> np.ndarray:
    """The 64-bit xxh3 hash of each string's UTF-8 bytes, read straight from the Arrow buffers (no Python str is
    made)."""
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    if len(a) == 0:
        return np.empty(0, np.uint64)
    ends, data = _offsets(a)
    ends = ends.tolist()
    view, h = memoryview(data if data is not None else b""), xxhash.xxh3_64_intdigest
    return np.fromiter((h(view[s:e]) for s, e in zip(ends[:-1], ends[1:])), np.uint64, count=len(a))


def _pair_hashes(title: pa.Array, content: pa.Array) -> np.ndarray:
    return (_hashes(title) * np.uint64(0x9E3779B97F4A7C15)) ^ _hashes(content)


class _Dedup:
    """First occurrence wins; later ones are duplicates by uid, else by (title, content).

    Rows are compared by 64-bit hashes held in numpy (no set of Python strings): a row whose uid hash and pair hash
    are both new to the run and unique in its batch is kept at once, and only the few others are walked in order.
    """

    def __init__(self) -> None:
        self.uids, self.pairs = _HashSet(), _HashSet()

    def reasons(self, hu: np.ndarray, hp: np.ndarray) -> list[str | None]:
        """The duplicate reason (or None) of each row, given its uid hash and its (title, content) hash."""
        seen_u, seen_p = self.uids.contains(hu), self.pairs.contains(hp)
        code = np.zeros(len(hu), np.int8)
        local_u: set[int] = set()
        local_p: set[int] = set()
        for i in np.flatnonzero(seen_u | seen_p | _repeated(hu) | _repeated(hp)).tolist():
            u, pair = int(hu[i]), int(hp[i])
            if seen_u[i] or u in local_u:
                code[i] = 1
            elif seen_p[i] or pair in local_p:
                code[i] = 2
            else:
                local_u.add(u)
                local_p.add(pair)
        kept = code == 0
        self.uids.add(hu[kept])
        self.pairs.add(hp[kept])
        names = np.array([None, "duplicate_uid", "duplicate_record"], dtype=object)
        return names[code].tolist()


def _clean_fields(title, content, data: DataConfig) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Cleaned titles and contents, and the filter each failing row breaks (null: passes). Safe to run in threads."""
    title = clean_column(title, data.strip_stubs)
    content = clean_column(content, data.strip_stubs)
    tlen, clen = pc.utf8_length(title), pc.utf8_length(content)
    reason = pa.nulls(len(title), pa.string())
    checks = [(pc.equal(tlen, 0), "empty_title"), (pc.equal(clen, 0), "empty_content")]
    if data.filters:
        checks += [
            (pc.less(tlen, data.min_title_chars), "title_too_short"),
            (pc.less(clen, data.min_content_chars), "content_too_short"),
        ]
    if data.reject_blurbs:
        checks.append((pa.array([is_blurb(c) for c in content.to_pylist()], pa.bool_()), "review_blurb"))
    for mask, name in checks:
        reason = pc.if_else(pc.and_(pc.is_null(reason), mask), name, reason)
    return title, content, reason


def _clean_group(group: pa.RecordBatch | pa.Table, data: DataConfig) -> dict:
    """All that the ordered writer needs of one group of raw rows: each row's failed filter and the excerpt a reject
    would show, and for the rows that pass (only they can be kept) their cleaned title and content and dedup hashes.
    Runs on a thread."""
    col = {name: group.column(name) for name in ("line", "uid", "title", "content")}
    col = {k: v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v for k, v in col.items()}
    title, content, reason = _clean_fields(col["title"], col["content"], data)
    ok = pc.is_null(reason)
    # A reject's excerpt is of its raw texts. A row that passes the filters is rejected only as a duplicate (a few in a
    # million), and when cleaning left its texts as they were, the writer makes its excerpt from the cleaned texts it
    # holds: so only rejects and changed rows carry one here (null elsewhere): a third less excerpt text to hold.
    changed = pc.or_(pc.not_equal(col["title"], title), pc.not_equal(col["content"], content))
    title, content = title.filter(ok), content.filter(ok)
    return {
        "line": col["line"], "uid": col["uid"], "reason": reason,
        "excerpt": _excerpt(col["title"], col["content"], where=pc.or_(pc.invert(ok), changed)),
        "title": title, "content": content,
        "uid_hash": _hashes(col["uid"].filter(ok)), "pair_hash": _pair_hashes(title, content),
    }


def _without_rows(table: pa.Table, rows: list[int]) -> pa.Table:
    """`table` less the given rows (ascending, few: the duplicates of a group), as zero-copy slices between them:
    filtering copied every kept title and content of nearly every group, where a duplicate or two turns up."""
    pieces, start = [], 0
    for i in rows:
        pieces.append(table.slice(start, i - start))
        start = i + 1
    pieces.append(table.slice(start))
    return pa.concat_tables(pieces)


def _split_batch(group: dict, dedup: _Dedup) -> tuple[pa.Table, pa.Table]:
    """Records kept and rejects of one cleaned group; runs in file order so the first of duplicates is kept."""
    reason, uid, excerpt = group["reason"], group["uid"], group["excerpt"]
    ok = pc.is_null(reason)
    dup = dedup.reasons(group["uid_hash"], group["pair_hash"])
    kept = pa.table({"uid": uid.filter(ok), "title": group["title"], "content": group["content"]})
    if any(dup):
        dups = [i for i, d in enumerate(dup) if d is not None]
        # A duplicate whose texts cleaning left as they were has no excerpt yet: its cleaned texts are its raw ones.
        rows = np.zeros(len(reason), bool)
        rows[np.flatnonzero(ok.to_numpy(zero_copy_only=False))[dups]] = True
        rows = pa.array(rows)
        mine = _excerpt(group["title"].take(dups), group["content"].take(dups))
        excerpt = pc.replace_with_mask(excerpt, rows, pc.coalesce(excerpt.filter(rows), mine))
        kept = _without_rows(kept, dups)
        reason = pc.replace_with_mask(reason, ok, pa.array(dup, pa.string()))
        ok = pc.is_null(reason)
    bad = pc.invert(ok)
    rejects = pa.table(
        {"line": group["line"].filter(bad), "uid": uid.filter(bad), "reason": reason.filter(bad),
         "excerpt": excerpt.filter(bad)},
        schema=REJECT_SCHEMA,
    )
    return kept, rejects


def _batches(path: str) -> Iterator[pa.RecordBatch]:
    """A Parquet file's batches in order, without pre_buffer (pyarrow's default), which keeps every buffered row
    group until the reader goes away: memory would grow with the file."""
    return pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS)


def _cleaned_groups(path: str, data: DataConfig) -> Iterator[dict]:
    """`_clean_group` over raw.parquet's batches, in order, on two threads (Arrow kernels release the GIL), two in
    flight."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque = deque()
        for batch in _batches(path):
            pending.append(pool.submit(_clean_group, batch, data))
            if len(pending) >= 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def clean_folder(artifacts_dir: str | Path, raw: dict, data: DataConfig) -> Path:
    """The clean stage's folder for this raw.parquet and these settings (what the clean task and `desctune prepare`
    use)."""
    return stage_folder(artifacts_dir, "clean", raw["sha256"], raw["rejects_sha256"], data.subset(CLEAN_FIELDS))


def clean_file(raw: dict, data: DataConfig, out_dir: Path) -> dict:
    """Stream raw.parquet into out_dir/clean.parquet and out_dir/rejects.parquet (ingest's rejects merged in)."""
    out_dir = start_stage(out_dir, log)
    clean_path, rej_path = out_dir / "clean.parquet", out_dir / "rejects.parquet"
    reasons: Counter[str] = Counter()
    kept = 0
    dedup = _Dedup()

    def write_rejects(table: pa.Table) -> None:
        rw.write_table(table)
        for d in pc.value_counts(table.column("reason")).to_pylist():
            reasons[d["values"]] += d["counts"]

    with atomic_path(clean_path) as clean_tmp, atomic_path(rej_path) as rej_tmp:
        clean_sink, rej_sink = HashingSink(clean_tmp), HashingSink(rej_tmp)
        with clean_sink, rej_sink, pq.ParquetWriter(clean_sink, CLEAN_SCHEMA, **CLEAN_PARQUET) as cw, pq.ParquetWriter(
            rej_sink, REJECT_SCHEMA, **REJECT_PARQUET
        ) as rw:
            for rej in _batches(raw["rejects_path"]):
                write_rejects(pa.Table.from_batches([rej]).cast(REJECT_SCHEMA))
            for cleaned in _cleaned_groups(raw["path"], data):
                good, bad = _split_batch(cleaned, dedup)
                if good.num_rows:
                    cw.write_table(good)
                    kept += good.num_rows
                if bad.num_rows:
                    write_rejects(bad)
    pa.default_memory_pool().release_unused()
    duplicates = reasons["duplicate_uid"] + reasons["duplicate_record"]
    rejected = sum(reasons.values())
    log.info("clean: %d kept, %d rejected %s", kept, rejected, dict(reasons))
    return {
        "path": str(clean_path),
        "sha256": clean_sink.hexdigest(),
        "rejects_path": str(rej_path),
        "rejects_sha256": rej_sink.hexdigest(),
        "input_sha256": raw["sha256"],
        "lines_read": raw.get("lines_read"),
        "kept": kept,
        "rejected": rejected,
        "by_reason": dict(sorted(reasons.items())),
        "duplicates": duplicates,
    }

