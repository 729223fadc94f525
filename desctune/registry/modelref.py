"""Resolve a model reference to a local adapter folder: `models:/NAME@alias`, `models:/NAME/VERSION` or a folder.

Registered versions are downloaded once per store and version under `<artifacts>/registry/STORE/NAME/VERSION/`
(STORE: a short hash of the tracking URI, so two stores that both have a version 1 never share a folder), so aliases
can move while a loaded version stays where it is. A cached copy is used only while its content hash equals the
version's `adapter_sha256` tag: a folder left from an earlier store at the same URI (the database deleted and started
again) is downloaded afresh, with a warning. An adapter folder is looked up in the registry by its content hash, so the
demo and the evaluate/promote commands can still show the version and run it came from.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from desctune.errors import ModelRefError, NoRegisteredModel

REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))?$")

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    """A local adapter folder plus, when known, the registry version and MLflow run it came from."""

    ref: str
    adapter_dir: Path
    name: str | None = None
    version: str | None = None
    aliases: list[str] = field(default_factory=list)
    run_id: str | None = None
    tags: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.version is None:
            return f"adapter folder {self.adapter_dir}"
        alias = f" (@{', @'.join(self.aliases)})" if self.aliases else ""
        return f"{self.name} version {self.version}{alias}"


def parse_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of a `models:/` reference, None for anything else (a folder)."""
    m = REF.match(ref.strip())
    if m is None:
        if ref.strip().startswith("models:/"):
            raise ModelRefError(f"{ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        return None
    return m["name"], m["alias"], m["version"]


def find_adapter(folder: Path) -> Path | None:
    """The adapter inside a folder: the folder itself, or a downloaded pyfunc model's artifacts/adapter."""
    for candidate in (folder, folder / "artifacts" / "adapter"):
        if (candidate / "desctune.json").is_file():
            return candidate
    return None


def registry_version(client, name: str, alias: str | None, version: str | None):
    """The model version a reference names (latest version when it names neither alias nor version)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise NoRegisteredModel(f"no model named {name!r} is registered yet: run `make run` first") from None
        raise
    if alias is not None:
        if alias not in model.aliases:
            have = ", ".join(f"@{a} (version {v})" for a, v in sorted(model.aliases.items())) or "none"
            raise ModelRefError(f"{name} has no version with alias @{alias}; aliases: {have}")
        version = str(model.aliases[alias])
    elif version is None:
        versions = client.search_model_versions(f"name = '{name}'")
        version = str(max(int(v.version) for v in versions))
    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise ModelRefError(f"{name} has no version {version}") from None


def store_key(tracking_uri: str) -> str:
    """A short, stable name for a tracking store: the first 12 hex digits of its URI's sha256."""
    return hashlib.sha256(tracking_uri.strip().rstrip("/").encode()).hexdigest()[:12]


def cache_dir(artifacts_dir: str | Path, tracking_uri: str, name: str, version: str) -> Path:
    """Where a registered version of this store is downloaded: <artifacts>/registry/STORE/NAME/VERSION (with an
    object-store artifacts_dir, in this worker's local mirror of it)."""
    from desctune.store import local_root

    return local_root(artifacts_dir) / "registry" / store_key(tracking_uri) / name / str(version)


def _hash_of(folder: Path | None) -> str | None:
    from desctune.files import dir_sha256

    return None if folder is None else dir_sha256(folder)


def download_version(name: str, version: str, tracking_uri: str, artifacts_dir: str | Path,
                     adapter_sha256: str | None = None) -> Path:
    """The version's adapter folder from this store (not mlflow's current one), downloaded once per store and
    version and checked against `adapter_sha256` (the version's tag; None: nothing to check) before every use."""
    import mlflow

    from desctune.files import atomic_dir
    from desctune.tracking import client

    dest = cache_dir(artifacts_dir, tracking_uri, name, version)
    adapter = find_adapter(dest)
    if adapter is not None and adapter_sha256 and _hash_of(adapter) != adapter_sha256:
        log.warning("the cached copy of models:/%s/%s in %s is not the adapter the registry names (adapter_sha256 "
                    "%s…): downloading it again", name, version, dest, adapter_sha256[:12])
        adapter = None
    if adapter is None:
        client(tracking_uri)  # models:/ URIs resolve in mlflow's current registry, whatever registry_uri says
        with atomic_dir(dest) as tmp:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp),
                                                tracking_uri=tracking_uri, registry_uri=tracking_uri)
        adapter = find_adapter(dest)
        if adapter is None:
            raise ModelRefError(f"models:/{name}/{version} holds no desctune adapter")
        if adapter_sha256 and (got := _hash_of(adapter)) != adapter_sha256:
            raise ModelRefError(f"models:/{name}/{version} holds an adapter with content hash {got[:12]}…, not the "
                                f"{adapter_sha256[:12]}… its adapter_sha256 tag names: its artifacts were changed")
    return adapter


def version_of_adapter(client, adapter_dir: Path):
    """The registered version whose adapter has this folder's content hash, if any."""
    from desctune.files import dir_sha256

    found = client.search_model_versions(f"tags.adapter_sha256 = '{dir_sha256(adapter_dir)}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def resolve(ref: str, tracking_uri: str, artifacts_dir: str | Path = "artifacts") -> ResolvedModel:
    """Turn a reference into a local adapter folder, with its registry version and run when there is one."""
    from desctune.tracking import client as make_client

    parsed = parse_ref(ref)
    client = make_client(tracking_uri)
    if parsed is None:
        folder = Path(ref).expanduser()
        if not folder.is_dir():
            raise ModelRefError(f"{ref!r} is neither a models:/ reference nor an existing folder")
        adapter = find_adapter(folder)
        if adapter is None:
            raise ModelRefError(f"{ref} is not a desctune adapter folder (no desctune.json)")
        mv = version_of_adapter(client, adapter)
        if mv is None:
            return ResolvedModel(ref=ref, adapter_dir=adapter.resolve())
        name, version = mv.name, str(mv.version)
    else:
        name, alias, version = parsed
        mv = registry_version(client, name, alias, version)
        version = str(mv.version)
        adapter = download_version(name, version, tracking_uri, artifacts_dir, mv.tags.get("adapter_sha256"))
    mv = client.get_model_version(name, version)
    return ResolvedModel(
        ref=ref, adapter_dir=adapter.resolve(), name=name, version=version, aliases=sorted(mv.aliases),
        run_id=mv.run_id, tags=dict(mv.tags),
    )
