"""The layering the product relies on: the core library imports no Prefect and nothing above it, each stage's code
version covers every core module the stage runs, and the two settings that once got lost on the way into the
registered model arrive there."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import ROOT, tiny_config
from desctune.stages import stage_modules
from test_evaluate import save_adapter
from test_register import register, stages_for

STAGE_TASKS = {"ingest": "tasks.ingest", "clean": "tasks.clean", "sample": "tasks.sample",
               "tokenize": "tasks.tokenize", "train": "tasks.train", "evaluate": "tasks.evaluate"}


def desctune_imports(module: str) -> set[str]:
    """The desctune modules `module` imports, at the top or inside functions."""
    path = ROOT / (module.replace(".", "/") + ".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "desctune":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if (ROOT / (n.replace(".", "/") + ".py")).is_file()} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "desctune"}
    return {m for m in found if m != "desctune"}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for dep in desctune_imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGE_TASKS))
def test_each_stage_code_version_covers_every_core_module_it_runs(stage):
    missing = closure(STAGE_TASKS[stage]) - set(stage_modules(stage))
    assert not missing, f"{stage}: add the module that imports {sorted(missing)} to STAGE_ENTRIES in desctune/stages.py"


def test_the_import_contract_holds():
    proc = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "5 kept, 0 broken" in proc.stdout


def test_the_core_and_the_registered_model_load_without_prefect():
    code = ("import sys; import desctune.training.loop, desctune.evaluation.evaluate, desctune.registry.pyfunc, "
            "desctune.registry.register, desctune.registry.lineage; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'tasks', 'flows', 'app')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_registered_model_decodes_with_the_runs_eval_settings_and_records_its_config(tmp_path, tiny_model_dir,
                                                                                      monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_dir, eval={"repetition_penalty": 1.37, "no_repeat_ngram_size": 4},
                      data={"path": "data/amazon_titles_eval.jsonl"}, registry={"model_name": "tiny-settings"})
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    version = register(cfg, stages_for(adapter, tiny_model_dir, 0.3))["version"]
    monkeypatch.setenv("DESCTUNE_ARTIFACTS", cfg.artifacts_dir)
    from desctune.tracking import client

    client(cfg)
    model = mlflow.pyfunc.load_model(f"models:/tiny-settings/{version}")
    python_model = model.unwrap_python_model()
    assert python_model.settings["repetition_penalty"] == 1.37
    assert python_model.settings["no_repeat_ngram_size"] == 4
    assert model.model_config == json.loads(cfg.model_dump_json())
    assert model.predict(pd.DataFrame({"title": ["Blue Ceramic Coffee Mug"]}), params={"max_new_tokens": 4})


def test_the_adapter_records_only_the_sections_training_read(tmp_path, tiny_model_dir, tiny_tokenizer):
    from desctune.models import provision
    from desctune.training.loop import train_adapter
    from test_train import records, token_files

    cfg = tiny_config(tmp_path, tiny_model_dir, train={"max_steps": 1, "warmup_ratio": 0.0},
                      eval={"repetition_penalty": 1.37}, data={"path": "somewhere/else.jsonl"})
    df = records(6)
    tokens = token_files(tmp_path, tiny_tokenizer, cfg, df.iloc[:4], df.iloc[4:])
    result = train_adapter(tokens, provision(str(tiny_model_dir), tmp_path), cfg, tmp_path / "out")
    recorded = json.loads((Path(result["adapter_path"]) / "desctune.json").read_text())["config"]
    assert recorded == {k: json.loads(getattr(cfg, k).model_dump_json()) for k in ("model", "lora", "train")}
