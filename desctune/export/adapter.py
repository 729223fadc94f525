"""Ship a trained adapter: merged into its base as a plain Hugging Face checkpoint, or as GGUF for llama.cpp and
Ollama with a Modelfile, each with a model card.

An export is written into a temporary sibling of the output folder and renamed into place at the end, so a failed or
interrupted export leaves nothing behind; the rename replaces nothing but an empty folder, so what someone else wrote
into the output folder meanwhile is never removed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from desctune.errors import ExportError
from desctune.export.gguf import qtypes, write_gguf
from desctune.files import dir_sha256, file_sha256, fsync_path, fsync_tree, make_dirs

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Titles the merge is checked on: the merged model's logits must equal the adapter model's.
CHECK_TITLES = ["Stainless Steel Insulated Water Bottle, 32 oz", "Men's Classic Fit Cotton Oxford Shirt",
                "USB-C Charging Cable 6 ft Braided Nylon"]
MERGE_TOLERANCE = 1e-3


def check_request(fmt: str, quant: str | None, out: str | Path) -> str:
    """The GGUF type to write (None for hf), or a one-line ExportError before anything is loaded or written: also
    when no folder can be created where `out` goes (tried with a probe folder, removed at once)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "hf" and quant not in (None, "native"):
        raise ExportError(f"--quant is for --format gguf; hf exports keep the base's dtype (got --quant {quant})")
    if fmt == "gguf":
        quant = quant or "f16"
        qtypes(quant)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: choose a new --out")
    where = out.absolute().parent
    while not where.exists():  # the folder make_dirs would create the first new folder in
        where = where.parent
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=where)).rmdir()
    except OSError as exc:
        raise unwritable(out, where, exc) from None
    return quant


def unwritable(out: Path, where: Path, exc: OSError) -> ExportError:
    """The one line for an --out that cannot be created: the path, the folder and the system's reason."""
    return ExportError(f"cannot write --out {out}: cannot create a folder in {where} ({exc.strerror or exc})")


def staging(out: Path) -> Path:
    """A new empty folder beside `out` (its parents created) to write the export in, with the umask's mode that `out`
    keeps (mkdtemp's would be private)."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        make_dirs(out.parent)
        tmp.mkdir()
        return tmp
    except OSError as exc:
        raise unwritable(out, out.parent, exc) from None


def place(tmp: Path, out: Path) -> None:
    """Rename the finished export `tmp` to `out`. rename(2) replaces an empty folder but never a non-empty one, so
    files that appeared in `out` during the export stay, and the export is refused instead."""
    fsync_tree(tmp)
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise unwritable(out, out.parent, exc) from None
        raise ExportError(f"{out} is no longer an empty folder (something was written there during the export): "
                          "it was left as it is and nothing was exported; choose a new --out") from None
    fsync_path(out.parent)


def base_dtype(base_dir: str | Path) -> torch.dtype:
    """The dtype the base checkpoint is stored in (float32 where its config does not say)."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    return DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), torch.float32)


@torch.no_grad()
def prompt_logits(model, tokenizer, system_prompt: str, titles: list[str]) -> list[torch.Tensor]:
    """Next-token logits over each title's whole prompt, one title at a time (no padding to differ)."""
    from desctune.data.tokenize import prompt_ids

    out = []
    for title in titles:
        ids = torch.tensor([prompt_ids(tokenizer, title, system_prompt)])
        out.append(model(input_ids=ids).logits[0].float())
    return out


def merge(adapter_dir: str | Path, artifacts_dir: str | Path, out_dir: Path) -> dict:
    """Fold the LoRA weights into the base and save the result, in the base's dtype, with the adapter's tokenizer and
    chat template: a folder that loads with transformers alone. Checks the merge on CHECK_TITLES first."""
    from desctune.config import ModelConfig
    from desctune.evaluation.generation import adapter_meta, load_adapter_model

    cpu = ModelConfig.model_validate({**adapter_meta(adapter_dir)["config"]["model"], "device": "cpu",
                                      "quantization": "none"})
    model, tokenizer, meta = load_adapter_model(adapter_dir, artifacts_dir, cpu)
    base_path = model.get_base_model().name_or_path  # the provisioned checkpoint the adapter was loaded on
    before = prompt_logits(model, tokenizer, meta["system_prompt"], CHECK_TITLES)
    merged = model.merge_and_unload()
    after = prompt_logits(merged, tokenizer, meta["system_prompt"], CHECK_TITLES)
    diff = max(float((a - b).abs().max()) for a, b in zip(before, after, strict=True))
    if diff > MERGE_TOLERANCE:
        raise ExportError(f"the merged model's logits differ from the adapter model's by {diff:.2g}: not exported")
    dtype = base_dtype(base_path)
    merged = merged.to(dtype)
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"dtype": str(dtype).removeprefix("torch."), "merge_max_logit_diff": diff}


def modelfile(gguf_name: str, tokenizer, system_prompt: str, eval_settings: dict) -> str:
    """An Ollama Modelfile whose TEMPLATE renders exactly what the tokenizer's chat template renders for a system
    prompt and one user turn, ready for the assistant's reply."""
    template = chat_markers(tokenizer)
    stop = tokenizer.eos_token
    return "\n".join([
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f'SYSTEM """{system_prompt}"""',
        f'PARAMETER stop "{stop}"',
        "PARAMETER temperature 0",
        f"PARAMETER repeat_penalty {eval_settings.get('repetition_penalty', 1.0)}",
        f"PARAMETER num_predict {eval_settings.get('max_new_tokens', 128)}",
        "",
    ])


SYSTEM_MARK, USER_MARK = "\x00SYSTEM\x00", "\x00PROMPT\x00"


def chat_markers(tokenizer) -> str:
    """The chat template as an Ollama (Go) template: rendered once with placeholders, which become .System/.Prompt."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM_MARK}, {"role": "user", "content": USER_MARK}],
        tokenize=False, add_generation_prompt=True)
    if SYSTEM_MARK not in rendered or USER_MARK not in rendered:
        raise ExportError("the tokenizer's chat template drops the system prompt or the user turn: no Modelfile")
    return rendered.replace(SYSTEM_MARK, "{{ .System }}").replace(USER_MARK, "{{ .Prompt }}")


def export_adapter(adapter_dir: str | Path, fmt: str, quant: str | None, out: str | Path, artifacts_dir: str | Path,
                   eval_settings: dict, card: Callable[[dict], str],
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the export into `out` (which must not exist or be empty, at the start and at the end) and return its
    manifest (also export.json).

    `eval_settings` are the decoding settings the Modelfile carries; `card(manifest)` renders the model card
    (README.md) from what was written."""
    from desctune.evaluation.generation import adapter_meta
    from desctune.models import EMBEDDED, embedded_gguf, load_tokenizer

    quant = check_request(fmt, quant, out)
    out = Path(out)
    meta = adapter_meta(adapter_dir)
    base = meta["base_model"]
    manifest = {"format": fmt, "quant": quant, "adapter_sha256": dir_sha256(adapter_dir), "base_model": base,
                "system_prompt": meta["system_prompt"], "config": meta["config"], "eval": eval_settings}
    tmp = staging(out)
    try:
        if fmt == "hf":
            log.info("merging %s into %s", adapter_dir, base["name"])
            manifest.update(merge(adapter_dir, artifacts_dir, tmp))
        else:
            merged = tmp / ".merged"
            log.info("merging %s into %s", adapter_dir, base["name"])
            manifest.update(merge(adapter_dir, artifacts_dir, merged))
            name = f"model-{quant}.gguf"
            source = embedded_gguf(base["name"]) if base["name"] in EMBEDDED else None
            log.info("writing %s", name)
            written = write_gguf(merged, tmp / name, quant, f"{base['name']}-desctune", base, source, progress)
            tokenizer = load_tokenizer(merged)
            (tmp / "Modelfile").write_text(modelfile(name, tokenizer, meta["system_prompt"], eval_settings))
            shutil.rmtree(merged)
            manifest.update(gguf={**written, "path": name, "sha256": file_sha256(tmp / name)})
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "README.md").write_text(card(manifest))
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
        place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
