"""`desctune evaluate`: the comparison table, the exact metrics.json shape, registry references and exit codes."""

import json

import pytest

from app.cli import main
from conftest import EVAL_DATA
from test_register import champion_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return champion_store(tmp_path_factory.mktemp("evaluate-cli"), tiny_model_dir, max_new_tokens=6)


def test_evaluate_champion_on_the_eval_file_writes_metrics_json(store, tmp_path, capsys):
    cfg, _, flags = store
    out = tmp_path / "metrics.json"
    ref = f"models:/{cfg.registry.model_name}@champion"
    assert main(["evaluate", "--model", ref, "--data", str(EVAL_DATA), "--limit", "3", "--out", str(out), *flags]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"n", "base", "finetuned", "difference", "wins", "sign_test_p", "claims"}
    assert metrics["n"] == 3 and set(metrics["claims"]["rates"]) == {"base", "finetuned", "reference"}
    for model in ("base", "finetuned"):
        assert set(metrics[model]) == {"bleu", "rougeL", "chrf", "length_ratio"}
        assert 0 <= metrics[model]["bleu"] <= 100 and 0 <= metrics[model]["rougeL"] <= 1
        assert 0 <= metrics[model]["chrf"] <= 100 and metrics[model]["length_ratio"] >= 0
    for key in ("bleu", "rougeL", "chrf"):
        diff = metrics["difference"][key]
        assert diff["low"] <= diff["delta"] <= diff["high"] and diff["verdict"] in (
            "better", "worse", "no significant difference")
    assert sum(metrics["wins"].values()) == 3 and 0 <= metrics["sign_test_p"] <= 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{cfg.registry.model_name} version 1 (@challenger, @champion) on 3 examples of {EVAL_DATA}"
    assert lines[1].split() == ["BLEU", "ROUGE-L", "chrF++", "length"]
    b, f = metrics["base"], metrics["finetuned"]
    assert lines[2].split() == ["base", f"{b['bleu']:.2f}", f"{b['rougeL']:.4f}", f"{b['chrf']:.2f}",
                                f"{b['length_ratio']:.2f}"]
    assert lines[3].split()[1:3] == [f"{f['bleu']:.2f}", f"{f['rougeL']:.4f}"]
    assert any(line.endswith("95% CI") and "ROUGE-L" in line for line in lines)


def test_evaluate_an_adapter_folder_and_a_version_number_agree(store, tmp_path):
    cfg, adapter, flags = store
    data = ["--data", str(EVAL_DATA), "--limit", "2"]
    outs = [tmp_path / "folder.json", tmp_path / "version.json"]
    assert main(["evaluate", "--model", str(adapter), *data, "--out", str(outs[0]), *flags]) == 0
    assert main(["evaluate", "--model", f"models:/{cfg.registry.model_name}/1", *data, "--out", str(outs[1]), *flags]) == 0
    assert json.loads(outs[0].read_text()) == json.loads(outs[1].read_text())


@pytest.mark.parametrize(
    "ref, data, message",
    [
        ("models:/tiny-desctune@prod", None, "tiny-desctune has no version with alias @prod"),
        ("models:/nobody@champion", None, "no model named 'nobody' is registered yet"),
        ("models:/tiny-desctune/7", None, "tiny-desctune has no version 7"),
        ("no/such/folder", None, "is neither a models:/ reference nor an existing folder"),
        ("models:/tiny-desctune@champion", "missing.jsonl", "data file not found: missing.jsonl"),
    ],
)
def test_evaluate_errors_are_one_line_and_exit_2(store, capsys, ref, data, message):
    _, _, flags = store
    assert main(["evaluate", "--model", ref, "--data", data or str(EVAL_DATA), "--limit", "1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("desctune: ") and message in err[0]


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_a_limit_below_one_is_refused_not_a_silent_drop_or_nan(store, capsys, limit):
    cfg, _, flags = store
    ref = f"models:/{cfg.registry.model_name}@champion"
    assert main(["evaluate", "--model", ref, "--data", str(EVAL_DATA), "--limit", limit, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["desctune: invalid config at limit: Input should be greater than or equal to 1 (1 error(s))"]


def test_the_blurb_filter_shapes_training_not_the_records_a_model_is_judged_on(store, tmp_path):
    from desctune.data.clean import clean_text, is_blurb

    cfg, _, flags = store
    first = [json.loads(line) for line in EVAL_DATA.read_text().splitlines()[:4]]
    assert any(is_blurb(clean_text(r["content"])) for r in first)  # so a filter applied here would change the set
    ref, outs = f"models:/{cfg.registry.model_name}@champion", [tmp_path / "all.json", tmp_path / "filtered.json"]
    for out, extra in zip(outs, ([], ["--set", "data.reject_blurbs=true"])):
        assert main(["evaluate", "--model", ref, "--data", str(EVAL_DATA), "--limit", "4", "--out", str(out),
                     *flags, *extra]) == 0
    assert json.loads(outs[0].read_text()) == json.loads(outs[1].read_text())
