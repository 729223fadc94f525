"""The demo app on a real registered tiny model: Streamlit's AppTest drives app/demo_page.py against a real MLflow registry
filled by a real finetune flow run; the `desctune demo` command's one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest

from app.demo_logic import highlight_claims, rate_line
from conftest import SAMPLE, head_records, tiny_config

APP = str(Path(__file__).resolve().parents[1] / "app" / "demo_page.py")


def registered_model(tmp_path_factory, tiny_model_dir) -> Path:
    """Run the finetune flow once per test session and make its version the champion, as `promote` would.

    Shared with the browser test through a folder under the session's temp root; returns the config's YAML path.
    """
    from desctune.config import config_to_yaml
    from desctune.tracking import client
    from flows.finetune import finetune

    root = tmp_path_factory.getbasetemp() / "demo-registry"
    cfg_path = root / "config.yaml"
    if not cfg_path.is_file():
        root.mkdir(exist_ok=True)
        records = head_records(SAMPLE, root / "records.jsonl", 40)
        cfg = tiny_config(root, tiny_model_dir, records, data={"val_fraction": 0.15, "test_fraction": 0.15})
        version = finetune(config=cfg).registered.version
        client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", version)
        cfg_path.write_text(config_to_yaml(cfg))
    return cfg_path


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_model_dir):
    from desctune.config import load_config
    from desctune.tracking import client

    cfg_path = registered_model(tmp_path_factory, tiny_model_dir)
    cfg = load_config(cfg_path)
    version = client(cfg).get_model_version_by_alias(cfg.registry.model_name, "champion")
    return cfg_path, cfg, version


def app(monkeypatch, config: Path, model: str | None = None) -> AppTest:
    monkeypatch.setenv("DESCTUNE_DEMO_CONFIG", str(config))
    if model is None:
        monkeypatch.delenv("DESCTUNE_DEMO_MODEL", raising=False)
    else:
        monkeypatch.setenv("DESCTUNE_DEMO_MODEL", model)
    return AppTest.from_file(APP, default_timeout=180).run()


def cached(cfg, version) -> Path:
    """Where the demo downloaded the version: the registry cache of this store."""
    from desctune.registry.modelref import cache_dir
    from desctune.tracking import tracking_uri

    return cache_dir(cfg.artifacts_dir, tracking_uri(cfg), cfg.registry.model_name, str(version.version))


def run_report(cfg, version) -> pd.DataFrame:
    import mlflow

    from desctune.tracking import tracking_uri

    path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="report/eval.parquet",
                                               tracking_uri=tracking_uri(cfg))
    return pd.read_parquet(path)


def test_no_registered_model_says_what_to_run_first(tmp_path, tiny_model_dir, monkeypatch):
    from desctune.config import config_to_yaml

    cfg_path = tmp_path / "empty.yaml"
    cfg_path.write_text(config_to_yaml(tiny_config(tmp_path, tiny_model_dir)))
    at = app(monkeypatch, cfg_path)
    assert not at.exception
    assert [e.value for e in at.error] == [
        "No model is registered yet (models:/tiny-desctune@champion). Run `make run` first, then reload this page."
    ]
    assert not at.button and not at.text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7"])
def test_a_shared_demo_loads_registry_references_only(tmp_path, tiny_model_dir, monkeypatch, host):
    """Served beyond loopback, the sidebar refuses a server path before touching it; a models:/ reference goes on
    to the registry (empty here, so the page says what to run first). On loopback the same path is tried."""
    from desctune.config import config_to_yaml

    cfg_path = tmp_path / "empty.yaml"
    cfg_path.write_text(config_to_yaml(tiny_config(tmp_path, tiny_model_dir)))
    monkeypatch.setenv("DESCTUNE_DEMO_HOST", host)
    at = app(monkeypatch, cfg_path)
    assert at.text_input(key="other_ref").label == "…or another registry reference"
    at.text_input(key="other_ref").input(str(tiny_model_dir)).run()
    assert not at.exception
    assert [e.value for e in at.error] == [("This demo is served beyond its machine, so it loads registry references "
                                            "only (models:/NAME@ALIAS or models:/NAME/VERSION), not folders on the "
                                            "server.")]
    at.text_input(key="other_ref").input("models:/tiny-desctune/1").run()
    assert [e.value for e in at.error] == [
        "No model is registered yet (models:/tiny-desctune/1). Run `make run` first, then reload this page."
    ]

    monkeypatch.setenv("DESCTUNE_DEMO_HOST", "127.0.0.1")
    at = app(monkeypatch, cfg_path)
    at.text_input(key="other_ref").input(str(tiny_model_dir)).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        f"Cannot load {tiny_model_dir}: {tiny_model_dir} is not a desctune adapter folder (no desctune.json)"]


def test_page_shows_champion_adapter_status_examples_and_metrics(registered, monkeypatch):
    cfg_path, cfg, version = registered
    at = app(monkeypatch, cfg_path)
    assert not at.exception and not at.error
    loaded = at.markdown[0].value
    assert f"{cfg.registry.model_name} version {version.version}" in loaded and "@champion" in loaded
    assert version.run_id in loaded and f"/runs/{version.run_id}?" in loaded  # the run id links to its page
    metrics = {m.label: m.value for m in at.metric}
    adapter = load_file(cached(cfg, version) / "artifacts" / "adapter" / "adapter_model.safetensors")
    assert metrics == {
        "Adapter loaded": "yes", "Adapter active": "yes",
        "LoRA parameters": f"{sum(t.numel() for t in adapter.values()):,}",
        "Target modules": str(len(cfg.lora.target_modules)),
    }
    assert "Adapter loaded, active and non-zero" in at.success[0].value
    report = run_report(cfg, version)
    assert at.selectbox(key="example").options == report["title"].tolist()
    assert len(at.get("vega_lite_chart")) == 3  # BLEU, ROUGE-L, chrF++, each with its scale
    shown = at.dataframe[0].value
    assert shown.loc["fine-tuned", "ROUGE-L"] == pytest.approx(float(version.tags["metric.finetuned_rougeL"]))
    assert shown.loc["base", "BLEU"] == pytest.approx(float(version.tags["metric.base_bleu"]))
    assert shown.loc["fine-tuned", "chrF++"] == pytest.approx(float(version.tags["metric.finetuned_chrf"]))
    scored = [c.value for c in at.caption if c.value.startswith("Scored on ")]  # the evaluation says its size
    assert scored == [f"Scored on {len(report)} examples of the run's test split, by the run that registered this "
                      f"version [`{version.run_id}`]({scored[0].split('](', 1)[1]}"]
    verdicts = [m.value for m in at.markdown if "95% CI" in m.value]
    assert len(verdicts) == 3 and any("ROUGE-L" in v for v in verdicts)
    claims = [m.value for m in at.markdown if "invented claims: base" in m.value]
    assert claims == [f"- invented claims: base {float(version.tags['metric.claims_base']):.0%} → fine-tuned "
                      f"{float(version.tags['metric.claims_finetuned']):.0%}, " + claims[0].split(", ", 1)[1]]


def test_generate_puts_base_and_finetuned_side_by_side_as_evaluated(registered, monkeypatch):
    """Greedy with the evaluation's token budget reproduces the evaluation's outputs for a test title."""
    cfg_path, cfg, version = registered
    at = app(monkeypatch, cfg_path, f"models:/{cfg.registry.model_name}/{version.version}")
    row = run_report(cfg, version).iloc[0]
    at.selectbox(key="example").select(row["title"]).run()
    assert at.text_input(key="title").value == row["title"]
    at.button[0].click().run()
    assert not at.exception
    outputs = at.session_state.outputs
    title, base, tuned = outputs["title"], outputs["base"], outputs["finetuned"]
    assert (title, base, tuned) == (row["title"], row["base_output"], row["finetuned_output"])
    assert outputs["done"] == ["base", "finetuned"] and all(outputs["stats"][m][0] > 0 for m in ("base", "finetuned"))
    captions = [c.value for c in at.caption if "tokens/s" in c.value][:2]
    rates = [rate_line(*outputs["stats"][m]) for m in ("base", "finetuned")]
    assert len(captions) == 2 and all(c.startswith(f"{r} · ") for c, r in zip(captions, rates))
    assert base != tuned
    # each output is shown with the claims its title cannot support marked, and the caption lists them
    shown = [m.value for m in at.markdown]
    for text, caption in zip((base, tuned), captions):
        marked, found = highlight_claims(text, title)
        assert marked in shown
        assert caption.endswith(f": {'; '.join(found)}" if found else "no invented claim found")
    assert [t.value for t in at.text] == [row["reference"]]
    assert not at.error

    at.radio[0].set_value("sample").run()
    at.button[0].click().run()
    sampled_base, sampled_tuned = at.session_state.outputs["base"], at.session_state.outputs["finetuned"]
    assert sampled_base and sampled_tuned and sampled_base != sampled_tuned


def test_all_zero_adapter_is_a_red_error_and_identical_outputs_too(registered, tmp_path, monkeypatch):
    """The original project's bug: an adapter that changes nothing. Here its LoRA B matrices are zeroed."""
    cfg_path, cfg, version = registered
    src = cached(cfg, version) / "artifacts" / "adapter"
    zero = shutil.copytree(src, tmp_path / "zero-adapter")
    weights = load_file(zero / "adapter_model.safetensors")
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in weights.items()}, zero / "adapter_model.safetensors")
    at = app(monkeypatch, cfg_path, str(zero))
    assert not at.exception and not at.success
    assert at.markdown[0].value.startswith(f"**Loaded:** adapter folder `{zero.resolve()}` (not in the registry)")
    assert [e.value for e in at.error] == ["The adapter's LoRA weights are all zero: training changed nothing, so no output can change."]
    at.text_input(key="title").input("Stainless Steel Electric Kettle 1.7 L").run()
    at.radio[0].set_value("sample").run()
    at.button[0].click().run()
    base, tuned = at.session_state.outputs["base"], at.session_state.outputs["finetuned"]
    assert base == tuned
    assert at.error[-1].value.startswith("The base and fine-tuned outputs are identical")


def test_registered_adapter_folder_is_traced_back_to_its_version(registered):
    from desctune.registry.modelref import resolve
    from desctune.tracking import tracking_uri

    _, cfg, version = registered
    by_alias = resolve(f"models:/{cfg.registry.model_name}@champion", tracking_uri(cfg), cfg.artifacts_dir)
    by_folder = resolve(str(by_alias.adapter_dir), tracking_uri(cfg), cfg.artifacts_dir)
    assert (by_folder.name, by_folder.version, by_folder.run_id) == (cfg.registry.model_name, str(version.version),
                                                                   version.run_id)
    assert "champion" in by_folder.aliases


@pytest.mark.parametrize(
    "model, message",
    [
        ("models:/{name}@nosuch", "Cannot load models:/{name}@nosuch: {name} has no version with alias @nosuch; "
                                  "aliases: @challenger (version {v}), @champion (version {v})"),
        ("models:/{name}/99", "Cannot load models:/{name}/99: {name} has no version 99"),
        ("models:/{name}/x/y", "Cannot load models:/{name}/x/y: 'models:/{name}/x/y' is not models:/NAME@ALIAS or "
                               "models:/NAME/VERSION"),
    ],
)
def test_unusable_model_reference_is_one_red_line(registered, monkeypatch, model, message):
    cfg_path, cfg, version = registered
    name = cfg.registry.model_name
    at = app(monkeypatch, cfg_path, model.format(name=name))
    assert not at.exception
    assert [e.value for e in at.error] == [message.format(name=name, v=version.version)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/adapter"], "desctune: --model /no/such/adapter: no such adapter folder"),
        (["--port", "70000"], "desctune: --port 70000 is not a TCP port (1-65535)"),
        (["--config", "/no/such.yaml"], "desctune: config file not found: /no/such.yaml"),
    ],
)
def test_demo_command_user_errors_are_one_line(argv, message, capsys):
    from app.cli import main

    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_demo_command_refuses_a_port_in_use(capsys):
    import socket

    from app.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"desctune: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


def test_adapter_problems_name_each_way_the_finetuned_column_could_be_the_base(registered, tiny_model_dir):
    from app.demo_logic import adapter_problems
    from desctune.config import ModelConfig
    from desctune.evaluation.generation import adapter_status, base_context, load_adapter_model
    from desctune.models import load_model
    from desctune.registry.modelref import resolve
    from desctune.tracking import tracking_uri

    _, cfg, _ = registered
    plain = adapter_status(load_model(tiny_model_dir, ModelConfig(name=str(tiny_model_dir))))
    assert adapter_problems(plain) == [
        "The adapter was not applied: the model has no LoRA layers, so 'fine-tuned' is the base model."
    ]
    adapter = resolve(f"models:/{cfg.registry.model_name}@champion", tracking_uri(cfg), cfg.artifacts_dir).adapter_dir
    model, _, _ = load_adapter_model(adapter, cfg.artifacts_dir)
    with base_context(model):
        assert adapter_problems(adapter_status(model)) == [
            "The adapter was not applied: its LoRA layers are disabled, so generations use the base weights."
        ]
    working = adapter_status(model)
    assert adapter_problems(working) == []
    same = pd.DataFrame({"base_output": ["a", "b", "c"], "finetuned_output": ["a", "b", "c"]})
    assert adapter_problems(working, same) == [
        "The fine-tuned outputs equal the base outputs on 100% of examples (limit 90%): the adapter has no effect."
    ]


def test_the_stream_grows_token_by_token_ends_as_side_by_side_and_stops_when_asked(registered):
    import threading

    from app.demo_logic import Settings, side_by_side, stream
    from desctune.evaluation.generation import load_adapter_model
    from desctune.registry.modelref import resolve
    from desctune.tracking import tracking_uri

    _, cfg, version = registered
    adapter = resolve(f"models:/{cfg.registry.model_name}/{version.version}", tracking_uri(cfg),
                      cfg.artifacts_dir).adapter_dir
    model, tokenizer, meta = load_adapter_model(adapter, cfg.artifacts_dir)
    title, settings = "Stainless Steel Electric Kettle 1.7 Litre", Settings(max_new_tokens=24)
    expected = side_by_side(model, tokenizer, title, meta["system_prompt"], settings)
    for adapter_on, want in ((False, expected[0]), (True, expected[1])):
        steps = list(stream(model, tokenizer, title, meta["system_prompt"], settings, adapter=adapter_on))
        texts, tokens = [s[0] for s in steps], [s[1] for s in steps]
        assert texts[-1] == want and len(set(texts)) > 2  # it arrived in pieces
        assert tokens == sorted(tokens) and 0 < tokens[-1] <= 24 and steps[-1][2] > 0

    stop = threading.Event()
    chunks = stream(model, tokenizer, title, meta["system_prompt"], Settings(max_new_tokens=200), True, stop)
    next(chunks)
    stop.set()
    *_, (_, tokens, _) = chunks
    assert tokens < 200


def test_the_evaluation_panel_names_what_it_was_scored_on_and_its_size():
    from app.demo_logic import Evaluation, examples_scored, own_evaluation

    counts = {"eval/better": 56, "eval/worse": 44, "eval/same": 0}
    held_out = own_evaluation({"data.test_input": "data/amazon_titles_eval.jsonl"}, "r1", counts)
    assert held_out.scored_on("LINK", 1) == (
        "Scored on 100 examples of the held-out file data/amazon_titles_eval.jsonl, by the run that registered this "
        "version LINK.")
    assert own_evaluation({"metric.n": "28"}, "r1", {}).scored_on("LINK", 1) == (
        "Scored on 28 examples of the run's test split, by the run that registered this version LINK.")
    check = Evaluation("r2", 200, "the file data/eval.jsonl", {}, {}, own=False)
    assert check.scored_on("LINK", 2) == ("Scored on 200 examples of the file data/eval.jsonl, by evaluation run LINK "
                                          "(the largest of the 2 evaluations of this version).")
    assert examples_scored({}, {"eval/n": 12.0}) == 12 and examples_scored({}, {}) is None


def test_the_panel_shows_the_largest_evaluation_the_registry_has_of_the_version(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    """A version registered with its evaluation on 6 test examples, then checked by the evaluate-champion flow on
    more held-out records: the panel shows that check, its size, its file and its run, not the 6-example one."""
    from desctune.config import GenerationConfig, config_to_yaml
    from desctune.tracking import client
    from flows.evaluate_champion import evaluate_champion
    from test_register import champion_store

    cfg, _, _ = champion_store(tmp_path, tiny_model_dir, 6)
    name = cfg.registry.model_name
    version = client(cfg).get_model_version_by_alias(name, "champion")
    assert version.tags["metric.n"] == "6"
    records = head_records(SAMPLE, tmp_path / "held-out.jsonl", 14)
    generation = GenerationConfig(**cfg.eval.model_dump(exclude={"test_path"})).updated(limit=10, max_new_tokens=6)
    out = evaluate_champion(dataset=str(records), alias="champion", model_name=name, generation=generation,
                            artifacts_dir=cfg.artifacts_dir, experiment=cfg.registry.experiment)
    metrics, run_id = out["evaluate"].metrics, out["mlflow"]["run_id"]
    assert metrics["n"] > 6
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text(config_to_yaml(cfg))
    at = app(monkeypatch, cfg_path)
    assert not at.exception and not at.error
    scored = [c.value for c in at.caption if c.value.startswith("Scored on ")]
    assert len(scored) == 1 and scored[0].startswith(
        f"Scored on {metrics['n']} examples of the file {records}, by evaluation run [`{run_id}`](")
    assert scored[0].endswith(" (the largest of the 2 evaluations of this version).")
    shown = at.dataframe[0].value
    assert shown.loc["fine-tuned", "ROUGE-L"] == pytest.approx(metrics["finetuned"]["rougeL"])
    assert shown.loc["base", "chrF++"] == pytest.approx(metrics["base"]["chrf"])
    assert shown.loc["fine-tuned", "ROUGE-L"] != pytest.approx(float(version.tags["metric.finetuned_rougeL"]))
    verdicts = [m.value for m in at.markdown if "95% CI" in m.value]
    assert len(verdicts) == 3 and any(f"{metrics['comparison']['rougeL']['delta']:+.4f}" in v for v in verdicts)
