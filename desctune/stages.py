"""Where each stage's outputs go: a content-addressed folder named by the stage's inputs and its code version.

A stage's code version is a hash of the source of the core modules it runs: its entry modules (STAGE_ENTRIES) and
every desctune module they import, at the top or inside functions, found by reading their source, plus the few core
modules every stage uses. Editing a stage's logic invalidates exactly that stage's folders and cached results.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import cache
from pathlib import Path

from pydantic import BaseModel

from desctune.files import stage_dir
from desctune.store import local_root

PACKAGE = Path(__file__).resolve().parent
# Modules every stage depends on, and the modules each stage's task calls into.
COMMON_MODULES = ("desctune.config", "desctune.errors", "desctune.files", "desctune.results", "desctune.stages",
                  "desctune.store")
_EVALUATE = ("desctune.evaluation.evaluate",)
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "ingest": ("desctune.data.ingest",),
    "clean": ("desctune.data.clean",),
    "sample": ("desctune.data.sample",),
    "tokenize": ("desctune.data.tokenize", "desctune.models"),
    "train": ("desctune.training.loop", "desctune.training.launch", "desctune.training.rank", "desctune.stagelock",
              "desctune.tracking"),
    "evaluate": _EVALUATE,
    "evaluate-model": _EVALUATE,
    "evaluate-champion": _EVALUATE,
    "evaluate-cli": _EVALUATE,
}


def module_file(name: str) -> Path | None:
    """The source file of a desctune module (a package's __init__.py), or None if `name` is not one."""
    parts = name.split(".")
    if parts[0] != "desctune":
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def desctune_imports(name: str) -> set[str]:
    """The desctune modules that module `name` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{a.name}" for a in node.names]
            found |= {c for c in candidates if module_file(c)} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m != "desctune" and module_file(m)}


@cache
def stage_modules(stage: str) -> tuple[str, ...]:
    """Every desctune module the stage runs: its entries, what they import, transitively, and the common core."""
    seen, todo = set(COMMON_MODULES), list(STAGE_ENTRIES[stage])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
        todo += sorted(desctune_imports(name) - seen)
    return tuple(sorted(seen))


def code_version(stage: str) -> str:
    """Hash of the source of the modules the stage runs (`stage_modules`)."""
    h = hashlib.sha256()
    for name in stage_modules(stage):
        h.update(name.encode() + b"\0" + module_file(name).read_bytes())
    return h.hexdigest()[:16]


def key_part(value) -> str:
    """One input of a stage's key as text: strings as they are, config sections by digest, the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.digest()
    return json.dumps(value, sort_keys=True, default=str)


def stage_folder(artifacts_dir: str | Path, stage: str, *inputs) -> Path:
    """The folder of one stage's outputs, named by its inputs (content hashes, config sections, or the
    {field: value} pairs that matter) and the stage's code version: runs that differ in either never share one.
    With a store URL it is the folder in this worker's local mirror (`desctune.store`)."""
    return stage_dir(local_root(artifacts_dir), stage, *map(key_part, inputs), code_version(stage))
