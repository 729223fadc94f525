"""The README and docs/: a short README, links that lead somewhere, and only commands, make targets and modules that
exist. Fast: it reads the Markdown files and builds the CLI's argparse parser (no servers, no model)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

# Fenced code blocks, also indented ones inside list items; inline code spans end at a blank line.
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.M | re.S)
SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
# A command as typed: at the start or after a space, a path (.venv/bin/desctune) or punctuation, never inside a name
# such as desctune-smollm2, desctune:cuda or desctune.host.
COMMAND = r"(?<![\w.-]){}[ \t]+([a-z][\w-]*)"
PYTHON_M = re.compile(r"(?<![\w.-])python3?[ \t]+-m[ \t]+([A-Za-z_][\w.]*)")
OURS = {"desctune", "app", "bench", "deployments", "flows", "tasks"}
PY_PATH = re.compile(r"(?<![\w./-])((?:desctune|app|bench|deployments|flows|tasks|tests)/[\w/]*\w\.py)\b")


def prose_and_code(text: str) -> tuple[str, str]:
    """The text with its code taken out, and the code: fenced blocks and inline spans, one per line."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    prose = FENCE.sub("\n", text)
    spans = [m.group(2) for m in SPAN.finditer(prose)]
    return SPAN.sub(" ", prose), "\n".join(blocks + spans)


def code(page: Path) -> str:
    return prose_and_code(page.read_text())[1]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("\n", page.read_text())):  # a heading may hold code: `desctune serve`
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def subcommands() -> set[str]:
    from app.cli import build_parser  # argparse only: the subcommands import their heavy modules when they run

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)[ \t]*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def module_exists(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def shown(pattern: re.Pattern | str) -> list[tuple[str, str]]:
    """(page, match) for every match of pattern in the code of the README and docs/*.md."""
    return [(page.relative_to(ROOT).as_posix(), m) for page in PAGES for m in re.findall(pattern, code(page))]


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {MAX_README_LINES})"


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for page in PAGES:
        prose, _ = prose_and_code(page.read_text())
        for target in LINK.findall(prose):
            if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_desctune_subcommand_shown_is_one_the_cli_has():
    found = shown(COMMAND.format("desctune"))
    assert {"run", "serve", "evaluate"} <= {name for _, name in found}  # the pattern still finds what is there
    known = subcommands()
    unknown = sorted({f"{page}: desctune {name}" for page, name in found if name not in known})
    assert not unknown, f"not subcommands of app/cli.py ({', '.join(sorted(known))}):\n" + "\n".join(unknown)


def test_every_make_target_shown_is_in_the_makefile():
    found = shown(COMMAND.format("make"))
    assert {"run", "test", "check", "install"} <= {name for _, name in found}
    targets = make_targets()
    unknown = sorted({f"{page}: make {name}" for page, name in found if name not in targets})
    assert not unknown, "not targets of the Makefile:\n" + "\n".join(unknown)


def test_every_module_and_file_of_the_checkout_shown_exists_outside_the_core():
    modules = [(p, m) for p, m in shown(PYTHON_M) if m.split(".")[0] in OURS - {"desctune"}]
    assert modules  # e.g. python -m deployments.deploy, python -m bench.gain
    missing = [f"{p}: python -m {m}" for p, m in modules if not module_exists(m)]
    missing += [f"{p}: {f}" for p, f in shown(PY_PATH) if not f.startswith("desctune/") and not (ROOT / f).is_file()]
    assert not missing, "\n".join(sorted(set(missing)))


def test_every_module_and_file_of_the_core_shown_exists():
    modules = [(p, m) for p, m in shown(PYTHON_M) if m.split(".")[0] == "desctune"]
    files = [(p, f) for p, f in shown(PY_PATH) if f.startswith("desctune/")]
    assert modules and files
    missing = [f"{p}: python -m {m}" for p, m in modules if not module_exists(m)]
    missing += [f"{p}: {f}" for p, f in files if not (ROOT / f).is_file()]
    assert not missing, "\n".join(sorted(set(missing)))
