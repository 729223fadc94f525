"""Charts that do not mislead: base and fine-tuned keep one fixed colour each, in the report's PNG and the demo."""

from __future__ import annotations

from PIL import Image


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def scored(n: int = 5) -> dict:
    """An evaluation's metrics as `score` and `score_claims` leave them (the figures the charts read)."""
    iv = {"bleu": (10.0, 2.0, 18.0), "rougeL": (0.1, 0.04, 0.16), "chrf": (-1.0, -3.0, 1.0)}
    return {
        "n": n,
        "base": {"bleu": 10.0, "rougeL": 0.2, "chrf": 30.0, "length_ratio": 0.8},
        "finetuned": {"bleu": 20.0, "rougeL": 0.3, "chrf": 29.0, "length_ratio": 1.1},
        "comparison": {k: {"delta": d, "low": lo, "high": hi, "verdict": "better" if lo > 0 else
                           "no significant difference"} for k, (d, lo, hi) in iv.items()},
        "claims": {"rates": {"base": {"any": 0.2}, "finetuned": {"any": 0.1}, "reference": {"any": 0.3}},
                   "comparison": {"any": {"delta": -0.1, "low": -0.3, "high": 0.1, "verdict": "no significant "
                                                                                             "difference"}}},
    }


def colours_of(image: Image.Image) -> set[tuple[int, int, int]]:
    return {c for _, c in image.convert("RGB").getcolors(1 << 20)}


def test_the_report_chart_draws_base_and_fine_tuned_in_their_own_colours(tmp_path):
    from desctune.evaluation.evaluate import COLORS, plot_metrics

    assert COLORS["base"] != COLORS["finetuned"]
    plot_metrics(scored(), tmp_path / "metrics.png")
    colours = colours_of(Image.open(tmp_path / "metrics.png"))
    assert rgb(COLORS["base"]) in colours and rgb(COLORS["finetuned"]) in colours
    # a metrics.json from before chrF++ and the intervals still draws
    plot_metrics({"n": 5, "base": {"bleu": 10.0, "rougeL": 0.2}, "finetuned": {"bleu": 20.0, "rougeL": 0.3}},
                 tmp_path / "old.png")
    assert rgb(COLORS["finetuned"]) in colours_of(Image.open(tmp_path / "old.png"))


def test_each_metric_gets_one_chart_with_both_models_on_one_scale_and_the_interval():
    """BLEU, ROUGE-L, chrF++ and the invented-claims share: one image each, both colours in it, and the interval
    of the difference drawn as a black whisker."""
    from desctune.evaluation.evaluate import COLORS, comparison_images

    images = comparison_images(scored())
    assert list(images) == ["bleu", "rougeL", "chrf", "claims"]
    for key, image in images.items():
        colours = colours_of(image)
        assert {rgb(COLORS["base"]), rgb(COLORS["finetuned"]), (0, 0, 0)} <= colours, key


def test_the_comparison_table_has_a_row_a_metric_with_both_models_and_the_difference():
    from desctune.evaluation.evaluate import comparison_table

    table = comparison_table(scored()).set_index("metric")
    assert list(table.index) == ["corpus BLEU (0-100)", "ROUGE-L F (0-1)", "chrF++ (0-100)",
                                 "outputs with an invented claim (share)", "median length / reference (characters)"]
    assert table.loc["ROUGE-L F (0-1)", ["base", "fine-tuned", "difference", "low", "high"]].tolist() == [
        0.2, 0.3, 0.1, 0.04, 0.16]
    assert table.loc["chrF++ (0-100)", "verdict"] == "no significant difference"
    assert table.loc["median length / reference (characters)", ["base", "fine-tuned"]].tolist() == [0.8, 1.1]


def test_the_demo_charts_give_each_model_its_colour():
    from app.demo_logic import chart, metrics_frame
    from desctune.evaluation.evaluate import COLORS

    tags = {f"metric.{m}_{k}": str(v) for m, v in (("base", 1.0), ("finetuned", 2.0)) for k in ("bleu", "rougeL")}
    frame, colours = chart(metrics_frame(tags), "BLEU")
    assert list(frame.columns) == ["base", "fine-tuned"] and list(frame.index) == ["BLEU"]
    assert colours == [COLORS["base"], COLORS["finetuned"]]
    assert metrics_frame({}, {"eval/base_bleu": 1.0, "eval/base_rougeL": 0.1, "eval/finetuned_bleu": 2.0,
                              "eval/finetuned_rougeL": 0.2}) is not None


def test_the_comparison_is_logged_into_the_run_once_as_charts_and_tables(tmp_path):
    """Into a real MLflow store: one `compare/` image chart a metric and the two tables; a retried task that logs
    again adds nothing (MLflow's log_table would append the rows, log_image add a second image)."""
    import pandas as pd
    from mlflow import MlflowClient

    from desctune.registry.lineage import evaluation_figures, log_comparison

    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = c.create_run(c.create_experiment("t", artifact_location=str(tmp_path / "mlruns"))).info.run_id
    metrics = scored(28)
    figures = pd.DataFrame(evaluation_figures(metrics), columns=["stage", "figure", "value"])
    for _ in range(2):
        log_comparison(c, run_id, metrics, figures)
    pngs = [a.path for a in c.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(p.split("+", 1)[0] for p in pngs) == [f"images/compare~{k}" for k in ("bleu", "chrf", "claims",
                                                                                         "rougeL")]
    tables = {n: pd.read_json(c.download_artifacts(run_id, f"report/{n}.json", str(tmp_path)), orient="split")
              for n in ("comparison", "figures")}
    assert len(tables["comparison"]) == 5 and tables["figures"].set_index("figure")["value"].to_dict()["n"] == 28
    assert c.get_run(run_id).data.metrics == {}  # no number became a one-bar chart
