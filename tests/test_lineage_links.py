"""The links desctune writes into texts MLflow renders as Markdown (a run's description, a version's description)
and into model cards: each is a Markdown link whose target is exactly the URL, never a bare URL that an auto-linker
extends over the ")" or "." after it."""

from __future__ import annotations

import re

from markdown_it import MarkdownIt

from desctune.registry.lineage import source_tags
from desctune.registry.links import md_link
from desctune.registry.modelcard import card
from desctune.registry.register import made_by

FLOW_RUN = "http://127.0.0.1:4200/runs/flow-run/0b4c2f1e-7a55-4d4e-9d0a-2f5e0c1d9a11"
RUN = "http://127.0.0.1:5000/#/experiments/1/runs/abc123?workflowType=machine_learning"
VERSION = "http://127.0.0.1:5000/#/models/tiny/versions/3?workflowType=machine_learning"
LINEAGE = {"prefect.flow_run_id": "0b4c2f1e-7a55-4d4e-9d0a-2f5e0c1d9a11", "prefect.flow_run_name": "calm-otter",
           "prefect.flow_run_url": FLOW_RUN}


def links(markdown: str) -> dict[str, str]:
    """Link text -> target of every link in `markdown` as CommonMark renders it."""
    html = MarkdownIt().render(markdown)
    return {re.sub(r"<[^>]+>", "", text): href for href, text in re.findall(r'<a href="([^"]*)">(.*?)</a>', html)}


def bare_urls(markdown: str) -> list[str]:
    """URLs that are not the target of a Markdown link: an auto-linker would take what follows them along."""
    found = re.finditer(r"https?://[^\s]+", markdown)
    return [m.group(0) for m in found if markdown[m.start() - 2 : m.start()] != "]("]


def test_the_run_description_links_its_flow_run_with_nothing_after_the_url():
    tags = source_tags(LINEAGE, "LoRA fine-tuning")
    note = tags["mlflow.note.content"]
    assert links(note) == {"Prefect flow run calm-otter": FLOW_RUN}, note
    assert bare_urls(note) == [], note
    assert tags["mlflow.source.name"] == FLOW_RUN and tags["mlflow.source.type"] == "JOB"


def test_a_run_without_a_flow_run_names_its_command_and_links_nothing():
    tags = source_tags({}, "Evaluation")
    assert tags["mlflow.source.type"] == "LOCAL" and links(tags["mlflow.note.content"]) == {}


def test_the_version_description_links_its_mlflow_run_and_its_flow_run():
    text = f"LoRA adapter on base that writes ..., {made_by('abc123', RUN, LINEAGE)}. Test set (6 examples)."
    assert links(text) == {"MLflow run abc123": RUN, "Prefect flow run calm-otter": FLOW_RUN}, text
    assert bare_urls(text) == []
    assert made_by("abc123") == "trained by MLflow run abc123"


def test_a_link_target_or_text_cannot_close_the_link_early():
    assert links(md_link("run [1]", "http://h/a (b)")) == {"run [1]": "http://h/a%20%28b%29"}


def test_the_model_card_links_the_run_the_version_and_the_flow_run():
    manifest = {"base_model": {"name": "base", "sha256": "0" * 64}, "format": "hf", "adapter_sha256": "1" * 64,
                "config": {}, "eval": {}, "system_prompt": "Write a description."}
    origin = {"name": "tiny", "version": "3", "run_id": "abc123", "run_url": RUN, "version_url": VERSION,
              "tags": {}, "run_tags": LINEAGE}
    text = card(manifest, origin)
    assert links(text) == {"abc123": RUN, "models:/tiny/3": VERSION, LINEAGE["prefect.flow_run_id"]: FLOW_RUN}
    assert bare_urls(text) == []
