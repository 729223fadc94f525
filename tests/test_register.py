"""Registry: the champion gate on a real MLflow store, the pyfunc model loaded back, promote/rollback, and a guarded
flow run that registers nothing."""

import mlflow
import pandas as pd
import pytest

from app.cli import main
from conftest import SAMPLE, head_records, tiny_config
from desctune.evaluation.significance import paired_mean, verdict
from desctune.files import dir_sha256
from desctune.registry.lineage import start_run
from desctune.registry.register import register_model, should_promote
from desctune.results import (BaseModelResult, CleanResult, EvaluateResult, IngestResult, RunStages, SampleResult,
                              Split, StageFile, StageFolder, TrainResult)
from desctune.tracking import client, tracking_uri
from test_evaluate import save_adapter


def test_gate_needs_strictly_better_than_base_and_champion():
    assert should_promote({"rougeL": 0.3}, {"rougeL": 0.2}, None, "rougeL")
    assert should_promote({"rougeL": 0.3}, {"rougeL": 0.2}, 0.25, "rougeL")
    assert not should_promote({"rougeL": 0.3}, {"rougeL": 0.2}, 0.3, "rougeL")
    assert not should_promote({"rougeL": 0.3}, {"rougeL": 0.2}, 0.35, "rougeL")
    assert not should_promote({"rougeL": 0.2}, {"rougeL": 0.2}, None, "rougeL")


def stages_for(adapter, base_dir, rougeL: float, base_rougeL: float = 0.1,
               per_example: list[float] | None = None) -> dict:
    """What the flow hands to register: a real adapter folder plus the evaluation's scores on one test set, with a
    per-example table whose fine-tuned ROUGE-L averages `rougeL` (`per_example` sets the rows; all equal by default)."""
    rows = per_example or [rougeL] * 6
    refs = [f"reference description number {i}" for i in range(len(rows))]
    table = pd.DataFrame({"reference": refs, "base_output": ["base"] * len(rows), "finetuned_output": refs,
                          "base_rougeL": [base_rougeL] * len(rows), "finetuned_rougeL": rows})
    eval_path = adapter.parent / f"eval-{rougeL}-{len(rows)}-{sum(rows):.6f}.parquet"
    table.to_parquet(eval_path)
    scores = {"bleu": 10 * rougeL, "rougeL": rougeL, "chrf": 20 * rougeL, "length_ratio": 1.0}
    base = {"bleu": 1.0, "rougeL": base_rougeL, "chrf": 2.0, "length_ratio": 0.5}
    comparison = {k: {"delta": scores[k] - base[k], "low": 0.0, "high": 2 * (scores[k] - base[k]), "verdict": "better"}
                  for k in ("bleu", "chrf")}
    comparison["rougeL"] = paired_mean(table["base_rougeL"].tolist(), rows)  # what the gate holds to the base
    comparison["rougeL"]["verdict"] = verdict(comparison["rougeL"])
    return {
        "base": {"name": str(base_dir), "sha256": dir_sha256(base_dir)},
        "ingest": {"input_sha256": "in" * 32}, "clean": {"sha256": "cl" * 32},
        "sample": {"train": {"sha256": "tr" * 32}, "test": {"sha256": "te" * 32, "path": "unused"}},
        "train": {"adapter_path": str(adapter), "adapter_sha256": dir_sha256(adapter)},
        "evaluate": {"eval_path": str(eval_path),
                     "metrics": {"n": len(rows), "base": base, "finetuned": scores, "comparison": comparison,
                                 "better": len(rows), "worse": 0, "same": 0, "sign_test_p": 0.03}},
    }


def typed(stages: dict) -> RunStages:
    """`stages_for`'s dict as the stage results register reads (those fields only: the others are left unset)."""
    s = stages
    return RunStages.model_construct(
        base=BaseModelResult.model_construct(**s["base"]),
        ingest=IngestResult.model_construct(**s["ingest"]),
        clean=CleanResult.model_construct(clean=StageFile.model_construct(**s["clean"])),
        sample=SampleResult.model_construct(**{k: Split.model_construct(**v) for k, v in s["sample"].items()}),
        train=TrainResult.model_construct(adapter=StageFolder.model_construct(path=s["train"]["adapter_path"],
                                                                              sha256=s["train"]["adapter_sha256"])),
        evaluate=EvaluateResult.model_construct(table=StageFile.model_construct(path=s["evaluate"]["eval_path"]),
                                                metrics=s["evaluate"]["metrics"]))


def register(cfg, stages) -> dict:
    run_id = start_run(cfg)
    return register_model(cfg, run_id, typed(stages))


def champion_store(tmp, tiny_model_dir, max_new_tokens: int):
    """A registry holding one champion version of a tiny adapter, and the --set flags that point the CLI at it."""
    cfg = tiny_config(tmp, tiny_model_dir)
    adapter = save_adapter(tiny_model_dir, tmp / "adapter")
    register(cfg, stages_for(adapter, tiny_model_dir, 0.3))
    flags = ["--set", f"artifacts_dir={cfg.artifacts_dir}", "--set", f"eval.max_new_tokens={max_new_tokens}",
             "--set", "eval.batch_size=4"]
    return cfg, adapter, flags


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """Four versions in a real SQLite registry: beats the base, worse, an exact tie (to 7 digits), better."""
    tmp = tmp_path_factory.mktemp("registry")
    cfg = tiny_config(tmp, tiny_model_dir)
    adapters = [save_adapter(tiny_model_dir, tmp / f"run{i}" / "adapter", seed=i) for i in range(4)]
    results = [register(cfg, stages_for(adapters[i], tiny_model_dir, score))
               for i, score in enumerate((0.1234561, 0.11, 0.1234561, 0.40))]
    return cfg, results


def test_champion_moves_only_for_a_strictly_better_challenger(registry):
    cfg, results = registry
    assert [r["promoted"] for r in results] == [True, False, False, True]
    assert [r["previous_champion"] for r in results] == [None, "1", "1", "1"]
    c = client(cfg)
    name = cfg.registry.model_name
    assert str(c.get_model_version_by_alias(name, "champion").version) == "4"
    assert str(c.get_model_version_by_alias(name, "challenger").version) == "4"
    assert c.get_registered_model(name).tags["champion_history"] == '["1", "4"]'
    v4 = c.get_model_version(name, "4")
    assert v4.tags["champion.by"] == "finetune flow" and "beats base" in v4.tags["champion.reason"]
    for key in ("desctune.git_commit", "desctune.config_hash", "data.train_sha256", "data.test_sha256",
                "base_model_sha256", "adapter_sha256", "metric.finetuned_rougeL"):
        assert v4.tags[key]
    assert "ROUGE-L 0.1000 -> 0.4000" in v4.description
    assert c.get_run(v4.run_id).data.tags["desctune.model_version"] == f"{name}/4"


def test_each_config_field_is_one_param_of_the_run(registry):
    """The run logs its config as `section/key` params, the names MLflow gives the registered model's model_config
    when it logs that into the same run: each field once, not also as `section.key`."""
    cfg, _ = registry
    c = client(cfg)
    params = c.get_run(c.get_model_version(cfg.registry.model_name, "1").run_id).data.params
    assert params["data/path"] == cfg.data.path and params["lora/r"] == str(cfg.lora.r)
    assert [k for k in params if "." in k] == []


def test_registered_model_loads_back_through_mlflow_and_generates(registry, monkeypatch):
    cfg, _ = registry
    monkeypatch.setenv("DESCTUNE_ARTIFACTS", cfg.artifacts_dir)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_registry_uri(tracking_uri(cfg))
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    titles = pd.DataFrame({"title": ["Blue Ceramic Coffee Mug 12 oz", "Stainless Steel Kettle"]})
    tuned = model.predict(titles, params={"max_new_tokens": 8})
    base = model.predict(titles, params={"max_new_tokens": 8, "base": True})
    assert len(tuned) == 2 and all(isinstance(t, str) and t for t in tuned)
    assert tuned != base
    assert model.metadata.metadata["base_model"] == cfg.model.name


def test_promote_and_rollback_record_who_and_why(registry, monkeypatch, capsys):
    cfg, _ = registry
    monkeypatch.setenv("DESCTUNE_USER", "alice")
    store = ["--set", f"artifacts_dir={cfg.artifacts_dir}"]
    name = cfg.registry.model_name
    c = client(cfg)
    assert main(["promote", name, "2", "--reason", "reads better", *store]) == 0
    assert str(c.get_model_version_by_alias(name, "champion").version) == "2"
    v2 = c.get_model_version(name, "2")
    assert (v2.tags["champion.by"], v2.tags["champion.reason"]) == ("alice", "reads better")
    assert main(["rollback", name, "--reason", "complaints", *store]) == 0
    assert str(c.get_model_version_by_alias(name, "champion").version) == "4"
    assert c.get_model_version(name, "4").tags["champion.by"] == "alice"
    assert "complaints" in c.get_registered_model(name).tags["champion.last_change"]
    assert main(["rollback", name, *store]) == 0
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
    capsys.readouterr()
    assert main(["rollback", name, *store]) == 2
    assert main(["promote", name, "99", *store]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"desctune: {name} has no previous champion to roll back to (the champion is version 1)"
    assert err[1] == f"desctune: the registry has no model {name} version 99"
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"


def test_a_challenger_better_on_average_but_not_significantly_stays_challenger(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, registry={"model_name": "tiny-noisy"})
    adapters = [save_adapter(tiny_model_dir, tmp_path / f"run{i}" / "adapter", seed=i) for i in range(3)]
    champion = [0.1, 0.5] * 10
    noisy = [0.5, 0.1] * 9 + [0.5, 0.14]  # higher mean by 0.002, wins and losses alike
    steady = [v + 0.05 for v in champion]  # better on every record
    first = register(cfg, stages_for(adapters[0], tiny_model_dir, sum(champion) / 20, per_example=champion))
    second = register(cfg, stages_for(adapters[1], tiny_model_dir, sum(noisy) / 20, per_example=noisy))
    third = register(cfg, stages_for(adapters[2], tiny_model_dir, sum(steady) / 20, per_example=steady))
    assert [r["promoted"] for r in (first, second, third)] == [True, False, True]
    assert second["decision"].startswith("stays challenger: rougeL 0.302 beats base 0.1 and champion version 1 (0.3)")
    assert "but not significantly" in second["decision"] and "95% CI" in second["decision"]
    c = client(cfg)
    assert c.get_model_version("tiny-noisy", "2").tags["champion_gate"] == second["decision"]
    assert third["decision"].startswith("champion: rougeL 0.35 beats base 0.1 and champion version 1 (0.3) by +0.05")
    assert str(c.get_model_version_by_alias("tiny-noisy", "champion").version) == "3"


def test_the_same_adapter_and_evaluation_name_the_existing_version(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, registry={"model_name": "tiny-same"})
    adapter = save_adapter(tiny_model_dir, tmp_path / "run" / "adapter")
    first = register(cfg, stages_for(adapter, tiny_model_dir, 0.3))
    again = register(cfg, stages_for(adapter, tiny_model_dir, 0.3))
    assert again["version"] == first["version"] == "1" and again["unchanged"] and not again["promoted"]
    assert again["decision"].startswith("unchanged: version 1 already holds this adapter")
    c = client(cfg)
    assert len(c.search_model_versions("name = 'tiny-same'")) == 1
    assert c.get_run(again["run_id"]).data.tags["desctune.model_version"] == "tiny-same/1"
    retried = register_model(cfg, first["run_id"], typed(stages_for(adapter, tiny_model_dir, 0.3)))
    assert retried["version"] == "1" and len(c.search_model_versions("name = 'tiny-same'")) == 1


def test_min_improvement_raises_the_bar(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, registry={"model_name": "tiny-margin", "min_improvement": 0.1})
    adapters = [save_adapter(tiny_model_dir, tmp_path / f"run{i}" / "adapter", seed=i) for i in range(2)]
    register(cfg, stages_for(adapters[0], tiny_model_dir, 0.3))
    result = register(cfg, stages_for(adapters[1], tiny_model_dir, 0.35))
    assert not result["promoted"] and "registry.min_improvement 0.1" in result["decision"]


def test_guarded_flow_run_registers_nothing_and_its_mlflow_run_is_failed(tmp_path, tiny_model_dir):
    from flows.finetune import finetune

    records = head_records(SAMPLE, tmp_path / "records.jsonl", 30)
    cfg = tiny_config(tmp_path, tiny_model_dir, records, train={"max_steps": 2, "learning_rate": 1e-12},
                      eval={"limit": 4, "max_new_tokens": 6}, registry={"model_name": "tiny-guarded"})
    state = finetune(config=cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="all zero|equal the base outputs on 100%"):
        state.result()
    c = client(cfg)
    assert c.search_registered_models() == []
    runs = c.search_runs([c.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)


def test_evaluate_champion_flow_logs_its_own_run_tagged_with_the_version(registry, tmp_path):
    from desctune.config import GenerationConfig
    from flows.evaluate_champion import evaluate_champion

    cfg, _ = registry
    c = client(cfg)
    name = cfg.registry.model_name
    champion = str(c.get_model_version_by_alias(name, "champion").version)
    records = head_records(SAMPLE, tmp_path / "records.jsonl", 10)
    generation = GenerationConfig(**cfg.eval.model_dump(exclude={"test_path"})).updated(limit=3, max_new_tokens=6)
    out = evaluate_champion(dataset=str(records), alias="champion", model_name=name, generation=generation,
                            artifacts_dir=cfg.artifacts_dir)
    run = c.get_run(out["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["desctune.model_version"].startswith(f"{name} version {champion}")
    assert run.data.tags["prefect.flow_run_id"]
    assert run.data.tags["desctune.registered_model"] == name
    assert run.data.tags["desctune.registered_version"] == champion
    # headline scores only as metrics; the rest in one chart a metric and two tables
    assert set(run.data.metrics) == {f"eval/{m}_{k}" for m in ("base", "finetuned") for k in ("bleu", "rougeL", "chrf")
                                     } | {"eval/n"}
    assert run.data.metrics["eval/n"] == 3
    images = [a.path.split("/", 1)[1] for a in c.list_artifacts(run.info.run_id, "images")]
    assert {p.split("+", 1)[0] for p in images} == {"compare~bleu", "compare~rougeL", "compare~chrf", "compare~claims"}
    comparison = pd.read_json(c.download_artifacts(run.info.run_id, "report/comparison.json", str(tmp_path)),
                              orient="split")
    assert comparison.loc[1, "metric"] == "ROUGE-L F (0-1)"
    assert comparison.loc[1, "fine-tuned"] == pytest.approx(run.data.metrics["eval/finetuned_rougeL"])
    figures = pd.read_json(c.download_artifacts(run.info.run_id, "report/figures.json", str(tmp_path)),
                           orient="split")
    assert figures.set_index("figure").loc["n", "value"] == 3 and set(figures["stage"]) == {"eval"}
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"eval-raw", "eval"} and '"num_rows": 10' in inputs["eval-raw"].profile
    assert c.get_model_version(name, champion).tags["last_evaluation_run"] == run.info.run_id
    assert {a.path for a in c.list_artifacts(run.info.run_id, "report")} >= {"report/eval.parquet", "report/report.md"}


def test_two_different_runs_racing_to_register_leave_the_better_one_champion(tmp_path, tiny_model_dir):
    """Two runs of different configurations finish together, both better than the base: under the model's lock the
    second reads the first as champion and is compared with it, so the better one ends up champion whatever the
    order, and exactly one of them saw no champion."""
    import threading

    from tasks.register import register_serialized

    cfg = tiny_config(tmp_path, tiny_model_dir, registry={"model_name": "racing"})
    scores = (0.2, 0.6)
    stages = [stages_for(save_adapter(tiny_model_dir, tmp_path / f"run{i}" / "adapter", seed=10 + i), tiny_model_dir,
                         score, per_example=[score + 0.01 * (j % 3) for j in range(12)])
              for i, score in enumerate(scores)]
    run_ids = [start_run(cfg) for _ in scores]
    start, results, errors = threading.Barrier(2), {}, []

    def race(i: int) -> None:
        try:
            start.wait()
            results[i] = register_serialized(cfg, run_ids[i], typed(stages[i]), {})
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sorted(str(r["previous_champion"]) for r in results.values()).count("None") == 1
    champion = client(cfg).get_model_version_by_alias("racing", "champion")
    assert str(champion.version) == results[1]["version"]


def scored_against(stages: dict, base_rows: list[float]) -> dict:
    """`stages` whose evaluation scored the base `base_rows` on the same records: the per-example table, the base's
    mean and the paired interval of (fine-tuned - base), as the evaluation computes them."""
    path = stages["evaluate"]["eval_path"]
    table = pd.read_parquet(path).assign(base_rougeL=base_rows)
    table.to_parquet(path)
    metrics = stages["evaluate"]["metrics"]
    metrics["base"]["rougeL"] = sum(base_rows) / len(base_rows)
    metrics["comparison"]["rougeL"] = paired_mean(base_rows, table["finetuned_rougeL"].tolist())
    metrics["comparison"]["rougeL"]["verdict"] = verdict(metrics["comparison"]["rougeL"])
    return stages


def test_a_first_version_not_significantly_better_than_its_base_stays_challenger(tmp_path, tiny_model_dir):
    """With no champion yet, beating the base on average over 4 examples is noise: that version stays challenger and
    says why; a version better than the base on every one of the same records becomes the first champion."""
    cfg = tiny_config(tmp_path, tiny_model_dir, registry={"model_name": "tiny-first"})
    adapters = [save_adapter(tiny_model_dir, tmp_path / f"run{i}" / "adapter", seed=20 + i) for i in range(2)]
    base = [0.2, 0.3, 0.25, 0.1]
    noisy = [0.35, 0.1, 0.4, 0.12]  # +0.03 on average: two clear wins, a clear loss
    steady = [b + 0.2 for b in base]
    first = register(cfg, scored_against(stages_for(adapters[0], tiny_model_dir, sum(noisy) / 4, per_example=noisy),
                                         base))
    assert first["decision"].startswith("stays challenger: rougeL 0.2425 beats base 0.2125 by +0.03 [")
    assert first["decision"].endswith("95% CI, but not significantly: the interval does not lie above "
                                      "registry.min_improvement 0")
    assert not first["promoted"] and first["aliases"] == ["challenger"]
    c = client(cfg)
    assert c.get_model_version("tiny-first", first["version"]).tags["champion_gate"] == first["decision"]
    second = register(cfg, scored_against(stages_for(adapters[1], tiny_model_dir, sum(steady) / 4,
                                                     per_example=steady), base))
    assert second["promoted"] and second["previous_champion"] is None
    assert second["decision"] == ("champion: rougeL 0.4125 beats base 0.2125 by +0.2 [+0.2, +0.2], 95% CI, and there "
                                  "was no champion")
    assert str(c.get_model_version_by_alias("tiny-first", "champion").version) == second["version"]


def test_the_gate_holds_a_first_champion_to_its_interval_over_the_base():
    beats = {"rougeL": 0.3}, {"rougeL": 0.2}, None, "rougeL"
    assert not should_promote(*beats, base_interval={"delta": 0.1, "low": -0.01, "high": 0.2})
    assert should_promote(*beats, base_interval={"delta": 0.1, "low": 0.01, "high": 0.2})
    assert not should_promote(*beats, min_improvement=0.05, base_interval={"delta": 0.1, "low": 0.04, "high": 0.2})
