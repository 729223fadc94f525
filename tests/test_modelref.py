"""The registry download cache on real MLflow SQLite stores: keyed by store and version, and never trusted without
matching the version's adapter_sha256 tag."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from desctune.errors import ModelRefError
from desctune.files import dir_sha256
from desctune.registry.modelref import cache_dir, resolve

NAME = "cache-test"


def store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def register(uri: str, root: Path, weights: bytes, tag: str | None = None) -> str:
    """Register an adapter folder (desctune.json + weights) as a new version of NAME, tagged with its content hash
    the way `register` tags it (or with `tag`); returns the version."""
    from desctune.tracking import client

    c = client(uri)
    exp = c.get_experiment_by_name("cache") or None
    exp_id = exp.experiment_id if exp else c.create_experiment("cache", (root / "mlruns").resolve().as_uri())
    adapter = root / f"adapter-{len(list(root.glob('adapter-*')))}"
    adapter.mkdir(parents=True)
    (adapter / "desctune.json").write_text(json.dumps({"base_model": {"name": "tiny"}}))
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    run_id = c.create_run(exp_id).info.run_id
    c.log_artifacts(run_id, str(adapter), "model/artifacts/adapter")
    if not c.search_registered_models(f"name = '{NAME}'"):
        c.create_registered_model(NAME)
    version = c.create_model_version(NAME, f"runs:/{run_id}/model", run_id=run_id).version
    c.set_model_version_tag(NAME, version, "adapter_sha256", tag or dir_sha256(adapter))
    c.set_terminated(run_id, "FINISHED")
    return str(version)


def weights_of(uri: str, artifacts: Path, version: str) -> bytes:
    return (resolve(f"models:/{NAME}/{version}", uri, artifacts).adapter_dir / "adapter_model.safetensors").read_bytes()


EARLIER_RUN = """
import sys
from pathlib import Path
from test_modelref import register, store, weights_of

artifacts = Path(sys.argv[1])
assert register(store(artifacts), artifacts, b"model A") == "1"
assert weights_of(store(artifacts), artifacts, "1") == b"model A"
"""


def test_a_cached_version_from_a_deleted_store_is_downloaded_again_with_a_warning(tmp_path, caplog):
    artifacts = tmp_path / "artifacts"
    uri = store(artifacts)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    # an earlier process registered and downloaded its version 1 (its own process: MLflow keeps SQLite files open)
    subprocess.run([sys.executable, "-c", EARLIER_RUN, str(artifacts)], env=env, check=True, capture_output=True)
    # `make clean-artifacts`: the store goes, artifacts/registry stays; a new store at the same URI has its own v1
    (artifacts / "mlflow.db").unlink()
    shutil.rmtree(artifacts / "mlruns")
    assert register(uri, artifacts, b"model B") == "1"
    with caplog.at_level("WARNING", logger="desctune.registry.modelref"):
        assert weights_of(uri, artifacts, "1") == b"model B"
    assert any("is not the adapter the registry names" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="desctune.registry.modelref"):
        assert weights_of(uri, artifacts, "1") == b"model B"  # now cached, and right: no second download
    assert not caplog.records


def test_two_stores_with_the_same_name_and_version_never_share_a_download(tmp_path):
    artifacts = tmp_path / "artifacts"
    server, local = store(tmp_path / "server"), store(artifacts)  # e.g. a PostgreSQL server and the SQLite default
    assert register(server, tmp_path / "server", b"server model") == "1"
    assert register(local, artifacts, b"local model") == "1"
    assert weights_of(server, artifacts, "1") == b"server model"
    assert weights_of(local, artifacts, "1") == b"local model"
    assert weights_of(server, artifacts, "1") == b"server model"
    assert cache_dir(artifacts, server, NAME, "1") != cache_dir(artifacts, local, NAME, "1")
    assert cache_dir(artifacts, server, NAME, "1").relative_to(artifacts / "registry").parts[1:] == (NAME, "1")


def test_a_version_whose_artifacts_do_not_match_its_tag_is_refused_in_one_line(tmp_path):
    artifacts = tmp_path / "artifacts"
    uri = store(artifacts)
    version = register(uri, artifacts, b"model A", tag="0" * 64)
    with pytest.raises(ModelRefError) as err:
        resolve(f"models:/{NAME}/{version}", uri, artifacts)
    message = str(err.value)
    assert "not the 000000000000… its adapter_sha256 tag names" in message and "\n" not in message
