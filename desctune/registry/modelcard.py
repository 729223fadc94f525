"""The model card of an export: Hugging Face's README.md format (YAML metadata, then prose) with where the model came
from, what it was trained on and how, how it scored against its base and how surely, and what it is for."""

from __future__ import annotations

import json

import yaml

from desctune.evaluation.evaluate import METRIC_LABELS
from desctune.registry.links import md_link

# Hub ids of the embedded base models, for the card's base_model field.
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LICENSES = {"smollm2-135m-instruct": "apache-2.0"}
SCALES = {"bleu": "0-100", "rougeL": "0-1", "chrf": "0-100"}


def metadata(manifest: dict, origin: dict) -> dict:
    base = manifest["base_model"]["name"]
    meta = {
        "base_model": HUB_IDS.get(base, base),
        "library_name": "transformers" if manifest["format"] == "hf" else "gguf",
        "pipeline_tag": "text-generation",
        "tags": ["desctune", "lora-merged", "product-descriptions", *(["gguf"] if manifest["format"] == "gguf" else [])],
        "language": ["en"],
    }
    if base in LICENSES:
        meta["license"] = LICENSES[base]
    if origin.get("version"):
        meta["model_name"] = f"{origin['name']} v{origin['version']}"
    return meta


def evaluation_table(tags: dict) -> list[str]:
    """Base vs fine-tuned on the run's test set, with the paired 95% bootstrap interval of the difference."""
    rows = ["| metric | base | fine-tuned | difference (95% CI) | verdict |", "|---|---|---|---|---|"]
    for key, label in METRIC_LABELS.items():
        base, tuned = tags.get(f"metric.base_{key}"), tags.get(f"metric.finetuned_{key}")
        if base is None or tuned is None:
            continue
        delta = json.loads(tags.get(f"metric.delta_{key}", "null") or "null") or {}
        interval = (f"{delta['delta']:+.4f} [{delta['low']:+.4f}, {delta['high']:+.4f}]" if "low" in delta
                    else f"{float(tuned) - float(base):+.4f}")
        rows.append(f"| {label} ({SCALES.get(key, '')}) | {float(base):.4f} | {float(tuned):.4f} | {interval} | "
                    f"{delta.get('verdict', 'not measured')} |")
    if tags.get("metric.claims_base") is not None and tags.get("metric.claims_finetuned") is not None:
        d = json.loads(tags.get("metric.delta_claims") or "{}")
        interval = f"{d['delta'] * 100:+.0f} pts [{d['low'] * 100:+.0f}, {d['high'] * 100:+.0f}]" if "low" in d else "-"
        rows.append(f"| invented claims (share of outputs) | {float(tags['metric.claims_base']):.0%} | "
                    f"{float(tags['metric.claims_finetuned']):.0%} | {interval} | {d.get('verdict', 'not measured')} |")
    return rows if len(rows) > 2 else ["No evaluation is recorded for this adapter."]


def _linked(name: str, url: str | None) -> str:
    """`name` in code type, a Markdown link to `url` when there is one."""
    return md_link(f"`{name}`", url) if url else f"`{name}`"


def card(manifest: dict, origin: dict) -> str:
    """README.md of an export. `origin`: name, version, run_id, tags (the version's), run_tags, run_url, version_url."""
    tags, run_tags = origin.get("tags") or {}, origin.get("run_tags") or {}
    base, cfg = manifest["base_model"], manifest["config"]
    lora, train = cfg.get("lora", {}), cfg.get("train", {})
    title = (f"{origin['name']} version {origin['version']}" if origin.get("version")
             else f"desctune adapter {manifest['adapter_sha256'][:12]}")
    what = ("a plain Hugging Face checkpoint: the LoRA adapter merged into its base, loads with transformers alone"
            if manifest["format"] == "hf" else
            f"a GGUF file ({manifest['quant']}) of the merged model for llama.cpp and Ollama, with a Modelfile")
    verdicts = [json.loads(v).get("verdict") for k, v in tags.items() if k.startswith("metric.delta_")]
    if verdicts and all(v == "better" for v in verdicts):
        gain = "On its test set it beat its base on every metric, beyond the 95% intervals."
    elif verdicts:
        gain = ("On its test set its difference from the base is **not significant on every metric** (see the "
                "intervals): do not assume it writes better descriptions than the base without your own evaluation.")
    else:
        gain = "Nothing here says how it compares with its base: evaluate it with `desctune evaluate` before use."
    lines = [
        "---", yaml.safe_dump(metadata(manifest, origin), sort_keys=False).strip(), "---", "",
        f"# {title}", "",
        f"Writes an e-commerce product description from a product title. This export is {what}.", "",
        "## Origin", "",
        f"- Base model: `{base['name']}` (sha256 `{base['sha256'][:16]}…`, {base.get('source', 'unknown source')})",
        f"- Adapter sha256: `{manifest['adapter_sha256']}`",
    ]
    if origin.get("run_id"):
        lines.append(f"- MLflow run: {_linked(origin['run_id'], origin.get('run_url'))}")
    if origin.get("version"):
        uri = f"models:/{origin['name']}/{origin['version']}"
        lines.append(f"- Registered as {_linked(uri, origin.get('version_url'))}")
    if run_tags.get("prefect.flow_run_id"):
        lines.append(f"- Prefect flow run: `{run_tags.get('prefect.flow_run_name', '')}` "
                     f"{_linked(run_tags['prefect.flow_run_id'], run_tags.get('prefect.flow_run_url'))}")
    if tags.get("desctune.git_commit"):
        lines.append(f"- Code: desctune commit `{tags['desctune.git_commit']}`, config hash "
                     f"`{tags.get('desctune.config_hash', '')}`")
    lines += ["", "## Training data", ""]
    data = {k.removeprefix("data."): v for k, v in tags.items() if k.startswith("data.")}
    if data:
        lines += [f"- {k.replace('_sha256', '')} sha256: `{v}`" for k, v in sorted(data.items())]
        lines.append("- Records: product titles and descriptions (AmazonTitles-1.3MM format), cleaned (HTML "
                     "entities, broken UTF-8, tags) and filtered (title ≥ 10, description ≥ 100 characters).")
    else:
        lines.append("Not recorded: this adapter was exported from a folder the registry does not know.")
    lines += [
        "", "## Training settings", "",
        (f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
        f"targets {lora.get('target_modules')}; learning rate {train.get('learning_rate')}, "
        f"{train.get('epochs')} epochs, batch {train.get('batch_size')} × {train.get('grad_accum', 1)}, "
        f"max sequence {cfg.get('model', {}).get('max_seq_len')} tokens; loss on the response only."), "",
        "## Evaluation", "",
        *evaluation_table(tags), "",
        f"Greedy decoding, repetition penalty {manifest['eval'].get('repetition_penalty')}, at most "
        f"{manifest['eval'].get('max_new_tokens')} new tokens. Intervals are paired bootstrap intervals over the test "
        "examples. " + gain, "",
        "## Use", "",
        f"System prompt: \"{manifest['system_prompt']}\"; the user turn is the product title.", "",
        *usage(manifest), "",
        "## Intended use and limits", "",
        ("- Drafts of product descriptions for a human to review. It has seen only what its training records say; it "
        "invents features, sizes and materials a title does not state, and may repeat itself."),
        "- English product titles; trained on one marketplace's catalogue, whose style it copies.",
        "- Not for facts about a product (safety, compliance, compatibility): check every claim.",
        "",
    ]
    return "\n".join(lines)


def usage(manifest: dict) -> list[str]:
    if manifest["format"] == "hf":
        return ["```python", "from transformers import pipeline", 'generate = pipeline("text-generation", model="THIS_FOLDER")',
                f'messages = [{{"role": "system", "content": {manifest["system_prompt"]!r}}},',
                '            {"role": "user", "content": "Stainless Steel Insulated Water Bottle, 32 oz"}]',
                'print(generate(messages, max_new_tokens=128, do_sample=False)[0]["generated_text"][-1]["content"])',
                "```"]
    return ["```sh", "ollama create desctune -f Modelfile", 'ollama run desctune "Stainless Steel Insulated Water Bottle"',
            f"llama-cli -m {manifest['gguf']['path']} -cnv -sys {json.dumps(manifest['system_prompt'])}", "```"]
