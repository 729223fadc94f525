"""Artifacts on an object store: `artifacts_dir` may be a URL (`s3://bucket/prefix`, or any fsspec file system) as
well as a local path.

With a URL, the store is shared by every worker and each worker computes on a local mirror of it (torch and
transformers need local files): `$DESCTUNE_LOCAL_CACHE/<store hash>`, default `~/.cache/desctune/<store hash>`.
A finished folder (a stage's `stages/<stage>-<hash>`, an embedded model's `models/<name>-<hash>`) is *published*:
its marker is deleted, its files are uploaded under the same key, and then `_PUBLISHED` (every file's size and
sha256) is written last, so a folder whose upload was interrupted has no marker and is never trusted. Reading a
folder downloads the files its marker lists, checks each sha256, and moves the folder into the mirror as a whole.

Stage results (`desctune.results`) name their files by store URL (`portable`), the same on every worker, so cache
keys built from them match across machines; a task turns them back into local paths, fetching what its mirror lacks
(`localize`).
With a local `artifacts_dir` every function here is the identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Any

from desctune.errors import StoreError
from desctune.files import atomic_dir, atomic_path, file_sha256, make_dirs
from desctune.results import locations, with_paths

log = logging.getLogger(__name__)

MARKER = "_PUBLISHED"
CACHE_ENV = "DESCTUNE_LOCAL_CACHE"


def is_url(artifacts_dir: str | Path) -> bool:
    """True for an object-store URL (`s3://…`, `gs://…`, `memory://…`); a path or a `file://` URL is local."""
    scheme = urllib.parse.urlsplit(str(artifacts_dir)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def store_url(artifacts_dir: str | Path) -> str:
    url = str(artifacts_dir)
    return url if url.endswith("://") else url.rstrip("/")


def store_hash(url: str) -> str:
    return hashlib.sha256(store_url(url).encode()).hexdigest()[:12]


def local_root(artifacts_dir: str | Path) -> Path:
    """Where this worker reads and writes the artifacts: the folder itself, or its local mirror of a store URL."""
    if not is_url(artifacts_dir):
        return Path(artifacts_dir)
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "desctune"
    return Path(base).expanduser().resolve() / store_hash(str(artifacts_dir))


@lru_cache(maxsize=8)
def filesystem(url: str):
    """(fsspec file system, its path of the store's root) for a store URL; a one-line StoreError when the URL has
    no bucket or its driver is not installed (`check` tells whether the store answers)."""
    import fsspec

    if scheme_needs_bucket(url) and not urllib.parse.urlsplit(url).netloc:
        raise StoreError(f"artifacts_dir {url} names no bucket: use s3://BUCKET/PREFIX")
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = urllib.parse.urlsplit(url).scheme
        hint = " (pip install s3fs)" if scheme in ("s3", "s3a") else ""
        raise StoreError(f"artifacts_dir {url}: no file system for {scheme}://{hint}: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    root = root.rstrip("/")
    if not root:
        raise StoreError(f"artifacts_dir {url} names no bucket: use s3://BUCKET/PREFIX")
    return fs, root


def scheme_needs_bucket(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs")


def check(artifacts_dir: str | Path) -> None:
    """Fail early, in one line, when a store URL cannot be listed (wrong bucket, no credentials, no server)."""
    if not is_url(artifacts_dir):
        return
    url = store_url(artifacts_dir)
    fs, root = filesystem(url)
    bucket = root.split("/", 1)[0]
    try:
        fs.ls(bucket if scheme_needs_bucket(url) else root, detail=False)
    except FileNotFoundError:
        if scheme_needs_bucket(url):
            raise StoreError(f"artifacts_dir {url}: bucket {bucket} does not exist: create it first") from None
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp and gcsfs raise their own types
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise StoreError(f"artifacts_dir {url} cannot be reached ({type(exc).__name__}: {first}); check the "
                         "endpoint (AWS_ENDPOINT_URL) and credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
                         ) from None


def unit_of(rel: str) -> str:
    """The published folder a store-relative path belongs to: its first two parts (`stages/train-…`)."""
    parts = rel.strip("/").split("/")
    if len(parts) < 2:
        raise StoreError(f"{rel} is not inside a stage or model folder of the store")
    return "/".join(parts[:2])


def folder_files(folder: Path) -> dict[str, dict]:
    """{relative name: {size, sha256}} of every file under a folder, without the marker and writers' temporaries."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MARKER and not any(part.startswith(".") and ".tmp-" in part for part in
                                                     rel.split("/")):
            files[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return files


def read_marker(fs, key: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(f"{key}/{MARKER}"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a damaged marker is no marker: the folder is published again or recomputed


def upload(fs, folder: Path, key: str, files: dict[str, dict]) -> None:
    for rel in files:
        fs.put_file(str(folder / rel), f"{key}/{rel}")


def publish(artifacts_dir: str | Path, folder: str | Path, result: Any = None) -> Any:
    """Make the store hold this finished local folder, its marker last; returns `result` with its local paths made
    portable. Nothing is uploaded when the store already holds the same files (another worker published them)."""
    if not is_url(artifacts_dir):
        return result
    root_local = local_root(artifacts_dir)
    folder = Path(folder).resolve()
    rel = folder.relative_to(root_local).as_posix()
    if rel != unit_of(rel):
        raise StoreError(f"{folder} is not a stage or model folder of {root_local}")
    fs, root = filesystem(store_url(artifacts_dir))
    key = f"{root}/{rel}"
    files = folder_files(folder)
    marker = {"folder": rel, "files": files}
    published = read_marker(fs, key)
    if published is None or published.get("files") != files:
        if published is not None:
            fs.rm_file(f"{key}/{MARKER}")  # unpublished while its files change
        upload(fs, folder, key, files)
        fs.pipe_file(f"{key}/{MARKER}", json.dumps(marker, indent=1).encode())
        log.info("published %s to %s (%d files)", rel, store_url(artifacts_dir), len(files))
    with atomic_path(folder / MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=1))
    return portable(artifacts_dir, result)


def is_published(artifacts_dir: str | Path, rel: str) -> bool:
    fs, root = filesystem(store_url(artifacts_dir))
    return read_marker(fs, f"{root}/{unit_of(rel)}") is not None


def fetch(artifacts_dir: str | Path, rel: str) -> Path:
    """The local mirror of a published folder, downloaded (and every file's sha256 checked) unless the mirror
    already holds it; a StoreError when the store has no marker for it."""
    unit = unit_of(rel)
    local = local_root(artifacts_dir) / unit
    if (local / MARKER).is_file():
        return local
    url = store_url(artifacts_dir)
    fs, root = filesystem(url)
    marker = read_marker(fs, f"{root}/{unit}")
    if marker is None:
        raise StoreError(f"{url}/{unit} is not published in the store (no {MARKER} marker: its upload never "
                         "finished): run again with --refresh to recompute it")
    make_dirs(local.parent)
    with atomic_dir(local) as tmp:
        for name, meta in marker["files"].items():
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{unit}/{name}", str(dest))
            if file_sha256(dest) != meta["sha256"]:
                raise StoreError(f"{url}/{unit}/{name} does not match its marker (it changed while being read, "
                                 "e.g. another worker publishing the folder again, or it is damaged): run again")
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    log.info("fetched %s from %s (%d files)", unit, url, len(marker["files"]))
    return local


def refetch(artifacts_dir: str | Path, rel: str) -> Path:
    """Fetch a published folder again, replacing this worker's mirror of it (a file of the mirror changed)."""
    (local_root(artifacts_dir) / unit_of(rel) / MARKER).unlink(missing_ok=True)
    return fetch(artifacts_dir, rel)


def to_url(artifacts_dir: str | Path, path: str) -> str:
    """A path inside this worker's mirror as its store URL; any other path as it is."""
    prefix = str(local_root(artifacts_dir)) + os.sep
    return store_url(artifacts_dir) + "/" + Path(path[len(prefix):]).as_posix() if path.startswith(prefix) else path


def portable(artifacts_dir: str | Path, value: Any) -> Any:
    """`value` with every file it declares (`desctune.results`) inside this worker's mirror named by its store URL
    (identity for a local folder)."""
    if not is_url(artifacts_dir):
        return value
    return with_paths(value, lambda path: to_url(artifacts_dir, path))


def store_paths(artifacts_dir: str | Path, value: Any) -> list[str]:
    """The store-relative paths of the files a (portable) result declares."""
    if not is_url(artifacts_dir):
        return []
    prefix = store_url(artifacts_dir) + "/"
    return [loc.path[len(prefix):] for loc in locations(value) if loc.path.startswith(prefix)]


def localize(artifacts_dir: str | Path, value: Any) -> Any:
    """`value` with every store URL it declares replaced by its path in this worker's mirror, fetching each folder
    it lacks."""
    if not is_url(artifacts_dir):
        return value
    for unit in dict.fromkeys(unit_of(rel) for rel in store_paths(artifacts_dir, value)):
        fetch(artifacts_dir, unit)
    prefix, root = store_url(artifacts_dir) + "/", local_root(artifacts_dir)
    return with_paths(value, lambda path: str(root / path[len(prefix):]) if path.startswith(prefix) else path)


def canonical(artifacts_dir: str | Path, path: str | Path) -> str:
    """A folder's name that is the same on every worker: its store URL, or its absolute local path."""
    if is_url(artifacts_dir):
        return to_url(artifacts_dir, str(Path(path).resolve()))
    return str(Path(path).resolve())
