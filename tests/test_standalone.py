"""A clone of the repository stands on its own: no file points outside the checkout, and the tests that read the
shipped data pass in a copy of the checkout with nothing beside it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SESSION_ENV

# A path that may climb out of the checkout: a relative path up a level, or a pathlib walk up from the file. Each
# match is resolved from the file that holds it; only those that land outside the checkout count.
CLIMBS = re.compile(r"((?:\.\./)+)[\w.-]|parents\[(\d)\]|(parent\.parent\.parent)")
SHARED = re.compile(r"parent ?/ ?[\"']shared[\"']")


def leaves_checkout(name: str, line: str) -> bool:
    here = (ROOT / name).resolve()
    for m in CLIMBS.finditer(line):
        if m[1]:
            target = here.parent.joinpath(m[1]).resolve()
        else:
            target = here.parents[int(m[2]) if m[2] else 2]
        if target != ROOT and ROOT not in target.parents:
            return True
    return bool(SHARED.search(line))
# The tests that read the shipped data files through the product's readers (`desctune prepare`'s tests read them the
# same way and run in the outer session only).
DATA_TESTS = ["tests/test_ingest.py", "tests/test_evaluate_cli.py", "tests/test_standalone.py"]


def checkout_files() -> list[str]:
    """What a clone would hold: tracked files and untracked ones git does not ignore, as they are in the work tree."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def test_no_file_points_outside_the_checkout():
    offenders = []
    for name in checkout_files():
        if name.endswith(".jsonl"):
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                      if leaves_checkout(name, line)]
    assert offenders == []


def test_every_default_dataset_is_in_the_repository():
    from deployments.deploy import load_spec
    from desctune.config import Config

    [scheduled] = [d for d in load_spec()["deployments"] if d["name"] == "evaluate-champion"]
    for path in (scheduled["parameters"]["dataset"], Config().data.path):
        assert not Path(path).is_absolute() and (ROOT / path).is_file(), path


def data_tests_alone(tmp_path: Path) -> tuple:
    """A copy of the checkout with nothing beside it, where its modules import from, and its data tests' fast tier
    run there (conftest.py's `standalone_started` begins this ahead of the test)."""
    clone = tmp_path / "alone" / "desctune"
    for name in checkout_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, clone / name)
    env = {**SESSION_ENV, "PYTHONPATH": str(clone), "DESCTUNE_IN_CLONE": "1"}
    where = subprocess.run([sys.executable, "-c", "import desctune, tasks; print(desctune.__file__, tasks.__file__)"],
                           cwd=clone, env=env, capture_output=True, text=True, check=True).stdout
    # The fast tier reads the data through the same paths as the rest; the outer session runs the others.
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                           "not slow and not integration and not browser", *DATA_TESTS], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    return tmp_path, clone, where, proc


@pytest.mark.skipif(os.environ.get("DESCTUNE_IN_CLONE") == "1", reason="already running inside the copy")
def test_the_data_tests_pass_in_a_copy_with_nothing_beside_it(standalone_started):
    tmp_path, clone, where, proc = standalone_started.result()
    assert not (tmp_path / "shared").exists()
    assert where.count(str(clone)) == 2, where
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
