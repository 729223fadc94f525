"""Where each stage's outputs go: a content-addressed folder named by the stage's inputs and its code version.

Each stage's code version is a hash of the source of the core modules whose logic it runs, listed once in
STAGE_MODULES (a test fails when a stage's core module imports one that is not listed), so editing a stage's logic
invalidates exactly that stage's folders and cached results.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from pydantic import BaseModel

from desctune.files import stage_dir
from desctune.store import local_root

# Modules every stage depends on, and each stage's own core modules (with everything they import from desctune).
COMMON_MODULES = ("desctune.config", "desctune.errors", "desctune.files", "desctune.stages", "desctune.store")
_EVALUATE = ("desctune.evaluate", "desctune.significance", "desctune.inference", "desctune.models", "desctune.tokenize",
             "desctune.ingest", "desctune.clean", "desctune.parallel", "desctune.progress")
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "ingest": ("desctune.ingest", "desctune.parallel"),
    "clean": ("desctune.clean", "desctune.ingest", "desctune.parallel"),
    "sample": ("desctune.sample",),
    "tokenize": ("desctune.tokenize", "desctune.models"),
    "train": ("desctune.train", "desctune.memory", "desctune.trainops", "desctune.models", "desctune.tokenize",
              "desctune.stagelock", "desctune.tracking", "desctune.progress", "desctune.distributed",
              "desctune.launch"),
    "evaluate": _EVALUATE,
    "evaluate-model": _EVALUATE,
    "evaluate-champion": _EVALUATE,
    "evaluate-cli": _EVALUATE,
}


def code_version(stage: str) -> str:
    """Hash of the source of the stage's core modules (plus the config and file helpers every stage uses)."""
    h = hashlib.sha256()
    for name in (*STAGE_MODULES[stage], *COMMON_MODULES):
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
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
