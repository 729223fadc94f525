"""`desctune export`: a registered model or adapter as a merged Hugging Face folder or a GGUF file, with its card.

    desctune export --model REF --format hf|gguf [--quant f16|bf16|q8_0] --out DIR [--register]

REF is what `evaluate` takes: models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder. --register attaches the
export to the version it came from: an artifact of the version's run (exports/FORMAT[-QUANT]/) and a version tag.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def origin(cfg, found) -> dict:
    """What the model card says about where the model came from: the version, its run and the run's lineage."""
    from desctune.registry.register import version_url
    from desctune.tracking import client, run_url

    info = {"name": found.name, "version": found.version, "run_id": found.run_id, "tags": found.tags}
    if found.run_id:
        run = client(cfg).get_run(found.run_id)
        info.update(run_tags=dict(run.data.tags), run_url=run_url(cfg, found.run_id))
    if found.version:
        info["version_url"] = version_url(cfg, found.name, found.version)
    return info


def eval_settings(cfg, run_id: str | None) -> dict:
    """The decoding settings of the run that trained the model (its config.yaml), else the current config's."""
    import mlflow
    import yaml

    from desctune.config import Config
    from desctune.tracking import tracking_uri

    if run_id:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                       tracking_uri=tracking_uri(cfg))
            return Config.model_validate(yaml.safe_load(Path(path).read_text())).eval.model_dump()
        except (mlflow.exceptions.MlflowException, OSError, ValueError):
            pass
    return cfg.eval.model_dump()


def progress_bar():
    """A callback drawing one tqdm bar over the tensors written."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="writing tensors", unit="tensor")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def attach(cfg, found, out: Path, manifest: dict) -> str:
    """Log the export as an artifact of the version's run and tag the version with where it is."""
    from desctune.tracking import client

    c = client(cfg)
    folder = f"exports/{manifest['format']}" + (f"-{manifest['quant']}" if manifest["quant"] else "")
    c.log_artifacts(found.run_id, str(out), artifact_path=folder)
    uri = f"{c.get_run(found.run_id).info.artifact_uri}/{folder}"
    c.set_model_version_tag(found.name, found.version, f"export.{folder.removeprefix('exports/')}", uri)
    return uri


def cmd_export(args: argparse.Namespace) -> int:
    from app.runtime import config_from_args
    from desctune.errors import ExportError
    from desctune.export.adapter import check_request, export_adapter
    from desctune.registry.modelcard import card
    from desctune.registry.modelref import resolve
    from desctune.tracking import tracking_uri

    cfg = config_from_args(args)
    check_request(args.format, args.quant, args.out)
    found = resolve(args.model, tracking_uri(cfg), cfg.artifacts_dir)
    if args.register and found.version is None:
        raise ExportError(f"--register attaches an export to a registered version; {args.model} is not one")
    where = origin(cfg, found)
    started = time.perf_counter()
    print(f"exporting {found.label} as {args.format}" + (f" ({args.quant or 'f16'})" if args.format == "gguf" else ""))
    manifest = export_adapter(found.adapter_dir, args.format, args.quant, args.out, cfg.artifacts_dir,
                              eval_settings(cfg, found.run_id), lambda m: card(m, where), progress_bar())
    for name, size in manifest["files"].items():
        print(f"  {name:28} {size / 1e6:10.1f} MB")
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s (merged logits within "
          f"{manifest['merge_max_logit_diff']:.1g} of the adapter model's)")
    if args.register:
        print(f"attached to {found.label}: {attach(cfg, found, Path(args.out), manifest)}")
    if args.format == "gguf":
        print(f"Ollama: cd {args.out} && ollama create desctune -f Modelfile")
    return 0


def add_parser(sub) -> None:
    from app.runtime import add_config_flags

    p = sub.add_parser("export", help="merge a model into its base and write it as a Hugging Face folder or GGUF")
    p.add_argument("--model", required=True, metavar="REF", help="models:/NAME@ALIAS, models:/NAME/VERSION or DIR")
    p.add_argument("--format", required=True, metavar="hf|gguf", help="hf: merged checkpoint; gguf: llama.cpp/Ollama")
    p.add_argument("--quant", metavar="f16|bf16|q8_0", help="GGUF weight type (default f16)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty folder to write")
    p.add_argument("--register", action="store_true", help="attach the export to the registered version it came from")
    add_config_flags(p)
    p.set_defaults(func=cmd_export)
