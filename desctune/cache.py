"""How stage tasks are cached across runs.

Prefect's default policy includes the flow run id, so nothing would be reused between runs. Stages use
INPUTS + TASK_SOURCE with persisted results. TASK_SOURCE hashes only the task function's own text, so each stage
also takes `code=code_version(...)` as a default argument: a hash of the modules whose logic the stage runs.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE

STAGE_CACHE = INPUTS + TASK_SOURCE


def code_version(*module_names: str) -> str:
    """Hash of the named modules' source files (plus desctune's config and file helpers)."""
    h = hashlib.sha256()
    for name in (*module_names, "desctune.config", "desctune.files"):
        src = importlib.import_module(name).__file__
        h.update(Path(src).read_bytes())
    return h.hexdigest()[:16]
