"""Claims a description makes that its title cannot support: what a shop could not publish without checking.

`find_claims(text, title)` returns each flagged span with its kind:

- praise: quoted praise, a named review source, an attribution ("'...' Sunday Express", "--Publishers Weekly"), or a
  bestseller or award claim;
- boilerplate: publisher or copyright text copied from a listing ("Copyright ©", "Reed Business Information",
  "--This text refers to", "About the Author");
- number: a number with a unit (inches, GB, mAh, W, pages, pieces, years, ...) whose number is not in the title;
- entity: a named person, organisation, place or work the title does not mention: a run of two or more capitalised
  words, or a short quoted title.

A span is left alone when the title holds it (case and punctuation aside): "The Times" is no claim in a description of
*The Times Killer Su Doku*. The rules are plain regular expressions, conservative by design (a false flag on a good
description costs trust too); tests/data/claims_labels.jsonl holds outputs labelled by reading, and docs/evaluation.md
gives the detector's precision and recall per kind on them.

`claim_summary` turns the flags of a scored set into rates per model and kind, with the paired bootstrap interval of
(fine-tuned - base) for each, as ROUGE-L's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import SequenceMatcher

from desctune.evaluation import significance as sig

KINDS = ("praise", "boilerplate", "number", "entity")
KIND_LABELS = {
    "praise": "praise, review source or award",
    "boilerplate": "publisher boilerplate",
    "number": "number with a unit",
    "entity": "name or work not in the title",
}

_Q_CLOSE = "\"”’'"

# Review sources and prize names that only a blurb names. Ambiguous single words (Time, People, Choice) are left out.
_SOURCES = (
    r"Publishers? Weekly|Kirkus(?: Reviews)?|(?:School )?Library Journal|Booklist|Horn Book(?: Magazine)?|"
    r"New York Times(?: Book Review)?|Washington Post|Los Angeles Times|Chicago Tribune|Wall Street Journal|"
    r"USA Today|The Guardian|The Observer|The Independent|Sunday Times|(?:Daily|Sunday) Telegraph|Daily Mail|"
    r"Daily Express|Sunday Express|Evening Standard|The Economist|Times Literary Supplement|New Yorker|"
    r"Entertainment Weekly|Midwest Book Review|Amazon\.com Review|Starred Review|"
    r"Pulitzer(?: Prize)?|Booker(?: Prize)?|Newbery(?: Medal| Honor)?|Caldecott(?: Medal| Honor)?|"
    r"National Book Award|Hugo Award|Nebula Award|Edgar Award|Costa (?:Book )?Award"
)
# An attribution names its source (one to five capitalised words, not a sentence's opening word) and is followed by
# the end of the text or line, another quotation, or a dash: "...' Daily Mail 'Joyous...'", '..." --Time'.
_SOURCE_NAME = r"(?!(?:It|He|She|They|We|You|I|In|The|This|That|These|A|An|And|But|So|If|As|With|For|From|Its|" \
    r"His|Her|Their|Our|Your|My|What|When|While|Whether|Here|There)\b)" \
    r"[A-Z][\w.&'’]*(?:[ \t]+(?:of[ \t]+)?[A-Z][\w.&'’]*){0,4}"
_AFTER_SOURCE = r"(?=[ \t]*(?:$|\n|[\"'“‘(\[]|--|—|–|\*))"
_PRAISE = re.compile(
    rf"\b(?:{_SOURCES})\b"
    # the end of a quotation and its source
    rf"|(?<=[.!?…][{_Q_CLOSE}])[ \t]*(?:-{{1,2}}|—|–)?[ \t]*{_SOURCE_NAME}{_AFTER_SOURCE}"
    # a dash attribution after a sentence: "... read. --John Smith", "... — The Times"
    rf"|(?<=[.!?])[ \t]*(?:--|—|–)[ \t]*(?!This text){_SOURCE_NAME}{_AFTER_SOURCE}",
)
_PRAISE_CI = re.compile(
    r"\b(?:best[- ]?sell(?:ing|er)s?|award[- ]winning|prize[- ]winning|winner of the|critically acclaimed)\b"
    r"|\b(?:sold|selling)\s+(?:over\s+|more\s+than\s+)?[\d,.]+\s*(?:thousand|million|billion)?\s*copies\b",
    re.IGNORECASE,
)

_BOILERPLATE = re.compile(
    r"Copyright\s*(?:©|\(c\))?(?:\s*\d{4})?|COPYRIGHT|©\s*\d{0,4}|\(c\)\s*\d{4}|All rights reserved|"
    r"Reed Business Information|Cahners Business Information|This text refers to(?: an?| the)?|Amazon\.com Review|"
    # a listing's section heading, at the start of a line
    r"(?:^|(?<=\n))[ \t]*(?:Book Description|Product Description|From the Back Cover|From the Publisher|"
    r"About the Author|Editorial Reviews|Book Synopsis)\b",
)

_UNITS = (
    r"inch(?:es)?|in\.|cm|mm|centimeters?|millimeters?|meters?|metres?|feet|foot|ft|yards?|"
    r"[KMGT]B|[KMGT]Bps|mAh|[kKmM]?W|watts?|volts?|V|amps?|[kKMG]Hz|Hz|dB|mph|rpm|RPM|"
    r"pages?|pp\.|pieces?|pcs|pack|count|ct|oz|ounces?|lbs?|pounds?|kg|kilograms?|grams?|g|ml|mL|liters?|litres?|"
    r"gallons?|hours?|hrs?|minutes?|mins?|seconds?|years?|months?|weeks?|days?|"
    r"megapixels?|MP|channels?|books?|volumes?|novels?|titles?|recipes?|songs?|tracks?|photos?|photographs?|"
    r"illustrations?|stories|puzzles?|chapters?|colou?rs?|languages?|countries|copies|editions?|awards?|"
    r"episodes?|discs?|DVDs?|CDs?|players?|cards?|patterns?|projects?|exercises?|poems?|lessons?|units?|sales|"
    r"lines?|stations?|presets?|speeds?|levels?|settings?|modes?|ports?"
)
_NUMBER = re.compile(
    rf"(?<![\w.,/-])(?P<num>\d{{1,3}}(?:,\d{{3}})+|\d+(?:\.\d+)?)(?:-?(?:1/2|1/4|3/4))?"
    rf"(?:\s*(?:-\s*)?(?:(?:thousand|million|billion)\s+)?(?P<unit>{_UNITS})(?:\b|(?<=\.))|(?P<inch>[\"”'’])(?!\w))"
    # a year or a decade: "first published in 1972", "the 1920s"
    r"|(?<![\w.,/-])(?P<year>1[5-9]\d\d|20\d\d)s?\b",
    re.IGNORECASE,
)
_TITLE_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")

# Words that start a sentence or a span without naming anything, and connectors allowed inside a name.
_CONNECTORS = {"of", "the", "and", "de", "la", "le", "von", "van", "der", "du", "&", "for", "on", "in", "a", "to"}
_WORD = r"[A-Z](?:[\w'’&-]|\.(?=[A-Z]))*"  # no trailing period: a name does not run over a sentence's end
_CAPS_RUN = re.compile(  # words on one line: a heading above a line is not part of a name
    rf"{_WORD}(?:[ \t]+(?:(?:of|the|and|de|la|le|von|van|der|du|&|for|on|in|a|to)[ \t]+)*{_WORD})+"
)
# A quotation's text starts and ends next to its marks: the stretch between two quotations ('..." and I added "...')
# is none.
_QUOTED = re.compile(r"[\"“](?=\S)([^\"“”]{2,120}?)(?<=\S)[\"”]|(?<!\w)[‘']([A-Z][^‘’']{1,100})[’'](?!\w)")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;]\s+|\n\s*|[\"“(]\s*)$")
# Adjectives of nations and languages: a run of only these names nothing ("British and American").
_DEMONYMS = set(
    "american british english french german italian spanish irish scottish welsh european african asian chinese "
    "japanese indian russian canadian australian mexican greek roman latin christian jewish muslim catholic "
    "western eastern northern southern".split()
)
# Leading words dropped from a capitalised run wherever it stands ("The Palace of Reason" -> "Palace of Reason").
_DETERMINERS = {"the", "a", "an", "this", "that", "these", "those", "our", "your", "its", "his", "her", "their", "my"}
# Words that open a sentence or a heading without naming anything ("This Book", "The Perfect Gift").
_COMMON = set(
    "a an the this that these those it its he she they we you i our your their his her my each every all any some "
    "no not one two three four five six seven eight nine ten first second new great perfect ideal best good high "
    "easy simple with without for from in on at by to of and or but if when while as so whether if after before "
    "during about here there what which who how why where also more most many much both either neither such "
    "includes include including features feature product description book books brand set kit pack made use "
    "buy get make take enjoy discover learn read find see keep let please note ideal".split()
)


@dataclass(frozen=True)
class Claim:
    kind: str
    start: int
    end: int
    text: str


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower().replace("’", "'")).split())


def _in_title(span: str, title_norm: str, title_words: set[str]) -> bool:
    """Whether the title supports a span: it holds the span, or every word of the span that names something."""
    norm = _norm(span)
    if not norm:
        return True
    if f" {norm} " in f" {title_norm} ":
        return True
    words = [w for w in norm.split() if w not in _CONNECTORS]
    return bool(words) and all(w in title_words or w.rstrip("s") in title_words or w.removesuffix("'s") in title_words
                               for w in words)


def _close(word: str, title_words: set[str]) -> bool:
    """A word the title holds, or a misspelling of one (the small model garbles the title's own names: 'Humboldt
    Pie' for Humble Pie, 'Attenburger' for Attenborough)."""
    if word in title_words or word.rstrip("s") in title_words or word.removesuffix("'s") in title_words:
        return True
    return len(word) >= 4 and any(
        len(t) >= 4 and (t[:4] == word[:4] or SequenceMatcher(None, word, t).ratio() >= 0.75) for t in title_words)


def _garbled_title(span: str, title_words: set[str]) -> bool:
    """A capitalised run at least half of whose words are the title's, exact or misspelt, model codes aside: a
    garbled echo of the title ('River of Destin', 'Gates of Night' for At the Gates of Darkness), not a new name."""
    words = [w for w in _norm(span).split() if w not in _CONNECTORS and not any(ch.isdigit() for ch in w)]
    return not words or sum(_close(w, title_words) for w in words) * 2 >= len(words)  # model codes aside


def _numbers(title: str) -> set[str]:
    out = set()
    for m in _TITLE_NUMBER.findall(title):
        plain = m.replace(",", "")
        out.add(plain)
        out.update(p for p in re.split(r"[.,]", m) if p)
    return out


def _entities(text: str, title_norm: str, title_words: set[str]) -> list[Claim]:
    claims = []
    quoted_spans = []
    for m in _QUOTED.finditer(text):
        inner = (m.group(1) or m.group(2)).strip()
        quoted_spans.append((m.start(), m.end()))
        # a short, title-like quotation names a work; a long one is quoted praise (the praise rules see those)
        if _title_like(inner) and not _in_title(inner, title_norm, title_words) and not _garbled_title(
                inner, title_words):
            claims.append(Claim("entity", m.start(), m.end(), m.group()))
    for m in _CAPS_RUN.finditer(text):
        tokens = [(t.start() + m.start(), t.end() + m.start(), t.group()) for t in re.finditer(r"\S+", m.group())]
        # drop leading words that open a sentence or name nothing ("The", "This", "Perfect"), trailing connectors
        while tokens and (tokens[0][2].lower() in _DETERMINERS or tokens[0][2].lower() in _CONNECTORS
                          or (_SENTENCE_START.search(text[: tokens[0][0]]) and not _looks_named(tokens[0][2]))):
            tokens = tokens[1:]
        while tokens and tokens[-1][2].lower() in _CONNECTORS:
            tokens = tokens[:-1]
        named = [w for _, _, w in tokens if w.lower() not in _CONNECTORS]
        if len(named) < 2 or any(a <= tokens[0][0] < b for a, b in quoted_spans):
            continue
        if all(w.isupper() and len(w) <= 5 for w in named):  # spec acronyms: "USB HDMI", "LCD TV"
            continue
        if all(w.lower() in _DEMONYMS for w in named):  # "British and American"
            continue
        start, end = tokens[0][0], tokens[-1][1]
        if _in_title(text[start:end], title_norm, title_words) or _garbled_title(text[start:end], title_words):
            continue
        claims.append(Claim("entity", start, end, text[start:end]))

    return claims


def _title_like(quoted: str) -> bool:
    """A quotation that reads as a work's title: two to 12 words (one quoted word is more often a term than a
    work), not a sentence, its words capitalised (all but one at most, connectors aside)."""
    words = quoted.split()
    if len(words) < 2 or len(words) > 12 or quoted[-1:] in ".!?,":
        return False
    named = [w for w in words if w.lower() not in _CONNECTORS]
    return sum(w[:1].isupper() for w in named) >= max(1, len(named) - 1)


def _looks_named(word: str) -> bool:
    """A sentence's first word names something when it is not a common opener: 'Collins', not 'Perfect'."""
    return word.lower().strip(".,") not in _COMMON


def find_claims(text: str, title: str) -> list[Claim]:
    """The spans of `text` that claim what `title` cannot support, by kind, in text order (overlaps removed)."""
    if not text:
        return []
    title_norm = _norm(title)
    title_words = set(title_norm.split())
    found: list[Claim] = []
    for rx in (_PRAISE, _PRAISE_CI):
        for m in rx.finditer(text):
            span = m.group().strip(" -—–")
            if span and not _in_title(span, title_norm, title_words):
                found.append(Claim("praise", m.start(), m.end(), m.group()))
    for m in _QUOTED.finditer(text):  # a quotation of five words or more, not a work's title, is quoted praise
        inner = (m.group(1) or m.group(2)).strip()
        if len(inner.split()) >= 5 and not _title_like(inner) and not _in_title(inner, title_norm, title_words):
            found.append(Claim("praise", m.start(), m.end(), m.group()))
    for m in _BOILERPLATE.finditer(text):
        if not _in_title(m.group(), title_norm, title_words):
            found.append(Claim("boilerplate", m.start(), m.end(), m.group()))
    numbers = _numbers(title)
    for m in _NUMBER.finditer(text):
        if (m.group("num") or m.group("year")).replace(",", "") not in numbers:
            found.append(Claim("number", m.start(), m.end(), m.group()))
    found += _entities(text, title_norm, title_words)
    priority = {"boilerplate": 0, "praise": 1, "number": 2, "entity": 3}
    found.sort(key=lambda c: (c.start, priority[c.kind], -c.end))
    out: list[Claim] = []
    for c in found:
        if out and c.start < out[-1].end:  # overlapping spans: the first wins (at one start, the surer kind)
            continue
        gap = text[out[-1].end : c.start] if out else ""
        if out and c.kind == out[-1].kind and not gap.strip() and "\n" not in gap:  # "Winner of the" "Pulitzer"
            c = Claim(c.kind, out[-1].start, c.end, text[out[-1].start : c.end])
            out[-1] = c
            continue
        out.append(c)
    return out


def claim_flags(outputs: list[str], titles: list[str]) -> list[list[Claim]]:
    """The claims of each output against its title."""
    return [find_claims(o, t) for o, t in zip(outputs, titles)]


def rates(claims: list[list[Claim]]) -> dict:
    """Share of outputs with at least one claim, overall ('any') and per kind."""
    n = max(len(claims), 1)
    out = {"any": sum(bool(c) for c in claims) / n}
    for kind in KINDS:
        out[kind] = sum(any(x.kind == kind for x in c) for c in claims) / n
    return out


def claim_summary(titles: list[str], outputs: dict[str, list[str]],
                  references: list[str] | None = None) -> tuple[dict, dict[str, list[list[Claim]]]]:
    """Claim rates of base, fine-tuned (and the references, when given), and for each kind the paired 95% bootstrap
    interval of (fine-tuned - base) in share of outputs, with its verdict ('more claims', 'fewer claims' or 'no
    significant difference'); and each output's claims, by model."""
    flags = {name: claim_flags(outs, titles) for name, outs in outputs.items()}
    if references is not None:
        flags["reference"] = claim_flags(references, titles)
    summary: dict = {"rates": {name: rates(f) for name, f in flags.items()}, "comparison": {}}
    for kind in ("any", *KINDS):
        has = {name: [float(any(kind == "any" or x.kind == kind for x in c)) for c in flags[name]]
               for name in ("base", "finetuned")}
        interval = sig.paired_mean(has["base"], has["finetuned"])
        interval["verdict"] = {"better": "more claims", "worse": "fewer claims"}.get(
            sig.verdict(interval), "no significant difference")
        summary["comparison"][kind] = interval
    return summary, flags


def describe(summary: dict) -> str:
    """One line for people: 'invented claims: base 7% → fine-tuned 11%, +4 pts [-3, +12]'."""
    r, c = summary["rates"], summary["comparison"]["any"]
    ref = f" (references {r['reference']['any']:.0%})" if "reference" in r else ""
    return (f"invented claims: base {r['base']['any']:.0%} → fine-tuned {r['finetuned']['any']:.0%}, "
            f"{c['delta'] * 100:+.0f} pts [{c['low'] * 100:+.0f}, {c['high'] * 100:+.0f}]{ref}")
