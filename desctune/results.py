"""What each stage returns: a small frozen model whose files are declared as such, so the stage cache, the object-store
mirror (`desctune.store`) and the lineage find them by type, not by key names.

A file a stage wrote (`StageFile`) or a folder (`StageFolder`, the adapter) records its size and sha256 when written;
`changed` checks both before a cached result is reused (the size first, so most damage costs one stat). A `Location`
is a path with nothing recorded (the base checkpoint, named by its source's hash, which provisioning takes on every
run). `locations` and `with_paths` are the one walk over a result (models, and dicts, lists and tuples of them).

The core stage functions return plain dicts; `from_core` builds each result from one, and `core()` gives back the
dict a core function takes as its input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict

from desctune.files import dir_sha256, file_sha256


class Location(BaseModel):
    """A file or folder a result names, by local path or (on an object store, `desctune.store`) by store URL."""

    model_config = ConfigDict(frozen=True)

    path: str

    def changed(self) -> str | None:
        """Why the file is not the one recorded (None: it is, or nothing was recorded)."""
        return None


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class StageFile(Location):
    """A file a stage wrote, with its size and sha256 at that time."""

    sha256: str
    size: int

    @classmethod
    def written(cls, path: str | Path, sha256: str | None = None, **fields: Any):
        """The record of a file just written; its sha256 is taken when the writer did not hash it on the way."""
        return cls(path=str(path), sha256=sha256 or file_sha256(path), size=os.stat(path).st_size, **fields)

    def changed(self) -> str | None:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return "missing"
        if size != self.size:
            return f"size {size}, written {self.size}"
        digest = file_sha256(self.path)
        return None if digest == self.sha256 else f"sha256 {digest[:12]}, written {self.sha256[:12]}"


class StageFolder(StageFile):
    """A folder a stage wrote whole (`desctune.files.atomic_dir`): sha256 is `dir_sha256`, size the sum of its files'."""

    @classmethod
    def written(cls, path: str | Path, sha256: str | None = None, **fields: Any):
        return cls(path=str(path), sha256=sha256 or dir_sha256(path), size=folder_size(Path(path)), **fields)

    def changed(self) -> str | None:
        folder = Path(self.path)
        if not folder.is_dir():
            return "missing"
        size = folder_size(folder)
        if size != self.size:
            return f"size {size}, written {self.size}"
        digest = dir_sha256(folder)
        return None if digest == self.sha256 else f"sha256 {digest[:12]}, written {self.sha256[:12]}"


class StageResult(BaseModel):
    """A stage's result: frozen, stored by Prefect as JSON."""

    model_config = ConfigDict(frozen=True)

    def core(self) -> dict:
        """The dict the core functions take as this stage's result."""
        return self.model_dump()


class IngestResult(StageResult):
    raw: StageFile
    rejects: StageFile
    input_path: str
    input_sha256: str
    lines_read: int
    records: int
    rejected: int
    by_reason: dict[str, int]

    @classmethod
    def from_core(cls, d: dict) -> "IngestResult":
        return cls(raw=StageFile.written(d["path"], d["sha256"]),
                   rejects=StageFile.written(d["rejects_path"], d["rejects_sha256"]),
                   **{k: d[k] for k in ("input_path", "input_sha256", "lines_read", "records", "rejected",
                                         "by_reason")})

    def core(self) -> dict:
        return {"path": self.raw.path, "sha256": self.raw.sha256, "rejects_path": self.rejects.path,
                "rejects_sha256": self.rejects.sha256, **self.model_dump(exclude={"raw", "rejects"})}


class CleanResult(StageResult):
    clean: StageFile
    rejects: StageFile
    input_sha256: str
    lines_read: int | None
    kept: int
    rejected: int
    by_reason: dict[str, int]
    duplicates: int

    @classmethod
    def from_core(cls, d: dict) -> "CleanResult":
        return cls(clean=StageFile.written(d["path"], d["sha256"]),
                   rejects=StageFile.written(d["rejects_path"], d["rejects_sha256"]),
                   **{k: d[k] for k in ("input_sha256", "lines_read", "kept", "rejected", "by_reason", "duplicates")})

    def core(self) -> dict:
        return {"path": self.clean.path, "sha256": self.clean.sha256, "rejects_path": self.rejects.path,
                "rejects_sha256": self.rejects.sha256, **self.model_dump(exclude={"clean", "rejects"})}


class Split(StageFile):
    rows: int


class SampleResult(StageResult):
    input_sha256: str
    train: Split
    val: Split
    test: Split

    @classmethod
    def from_core(cls, d: dict) -> "SampleResult":
        return cls(input_sha256=d["input_sha256"],
                   **{s: Split.written(d[s]["path"], d[s]["sha256"], rows=d[s]["rows"]) for s in ("train", "val",
                                                                                                 "test")})


class BaseModelResult(StageResult):
    """The base checkpoint: `sha256` identifies its source (the embedded GGUF, or the folder's `dir_sha256`)."""

    name: str
    checkpoint: Location
    sha256: str
    source: str

    @classmethod
    def from_core(cls, d: dict) -> "BaseModelResult":
        return cls(name=d["name"], checkpoint=Location(path=d["path"]), sha256=d["sha256"], source=d["source"])

    def core(self) -> dict:
        return {"name": self.name, "path": self.checkpoint.path, "sha256": self.sha256, "source": self.source}


class TokenSplit(StageFile):
    rows: int
    dropped: dict[str, int]
    truncated: int
    tokens: int
    supervised_tokens: int


class TokenizeResult(StageResult):
    tokenizer: Location
    train: TokenSplit
    val: TokenSplit

    @classmethod
    def from_core(cls, d: dict) -> "TokenizeResult":
        splits = {s: TokenSplit.written(d[s]["path"], **{k: v for k, v in d[s].items() if k != "path"})
                  for s in ("train", "val")}
        return cls(tokenizer=Location(path=d["tokenizer_path"]), **splits)


class TrainResult(StageResult):
    adapter: StageFolder
    loss_plot: StageFile | None
    history: list[dict]
    train_loss_first: float | None
    train_loss_last: float | None
    train_loss_mean: float
    val_loss: float
    steps: int
    resumed_from: Location | None
    seconds: float
    tokens_per_s: float
    supervised_tokens_per_s: float
    seconds_per_step: float
    device: str
    dtype: str
    plan: dict
    trainable_params: int
    total_params: int
    peak_memory_mb: float | None
    mlflow_run_id: str | None

    @classmethod
    def from_core(cls, d: dict) -> "TrainResult":
        rest = {k: v for k, v in d.items() if k not in ("adapter_path", "adapter_sha256", "loss_plot", "resumed_from")}
        return cls(adapter=StageFolder.written(d["adapter_path"], d["adapter_sha256"]),
                   loss_plot=StageFile.written(d["loss_plot"]) if d.get("loss_plot") else None,
                   resumed_from=Location(path=d["resumed_from"]) if d.get("resumed_from") else None, **rest)


class EvaluateResult(StageResult):
    metrics: dict
    adapter_status: dict
    table: StageFile
    plot: StageFile
    metrics_file: StageFile
    report: StageFile

    @classmethod
    def from_core(cls, d: dict) -> "EvaluateResult":
        files = {"table": "eval_path", "plot": "plot_path", "metrics_file": "metrics_path", "report": "report_path"}
        return cls(metrics=d["metrics"], adapter_status=d["adapter_status"],
                   **{field: StageFile.written(d[key]) for field, key in files.items()})


class RegisterResult(StageResult):
    """The registry's decision for one run (`desctune.registry.register.register_model`)."""

    name: str
    version: str
    aliases: list[str]
    promoted: bool
    unchanged: bool
    decision: str
    previous_champion: str | None
    champion_metric: float | None
    model_uri: str
    run_id: str
    run_url: str
    version_url: str
    tracking_uri: str


class ScoredSet(StageResult):
    """The file a run is scored on instead of its test split (`eval.test_path`), ingested and cleaned."""

    ingest: IngestResult
    clean: CleanResult


def scored_records(sample: SampleResult, scored: ScoredSet | None) -> Split:
    """The records a run is scored on: the cleaned `eval.test_path` file when there is one, else the test split."""
    if scored is None:
        return sample.test
    f = scored.clean.clean
    return Split(path=f.path, sha256=f.sha256, size=f.size, rows=scored.clean.kept)


class RunStages(StageResult):
    """What the finetune flow's stages returned, as register and the lineage read them."""

    ingest: IngestResult
    clean: CleanResult
    sample: SampleResult
    base: BaseModelResult
    tokenize: TokenizeResult
    train: TrainResult
    evaluate: EvaluateResult
    scored: ScoredSet | None = None

    def test(self) -> Split:
        """The records the run was scored on (`scored_records`)."""
        return scored_records(self.sample, self.scored)


class FinetuneResult(RunStages):
    """The finetune flow's result: every stage's, and the registry's decision."""

    registered: RegisterResult


def locations(value: Any) -> Iterator[Location]:
    """Every file and folder a result declares, at any depth."""
    if isinstance(value, Location):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from locations(getattr(value, name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from locations(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from locations(v)


def with_paths(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with the path of every file and folder it declares replaced by `change(path)`."""
    if isinstance(value, Location):
        return value.model_copy(update={"path": change(value.path)})
    if isinstance(value, BaseModel):
        return value.model_copy(update={name: with_paths(getattr(value, name), change)
                                        for name in type(value).model_fields})
    if isinstance(value, dict):
        return {k: with_paths(v, change) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(with_paths(v, change) for v in value)
    return value
