"""Charts that do not mislead: base and fine-tuned keep one fixed colour each, in the report's PNG and the demo."""

from __future__ import annotations

from PIL import Image


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_the_report_chart_draws_base_and_fine_tuned_in_their_own_colours(tmp_path):
    from desctune.evaluation.evaluate import COLORS, plot_metrics

    assert COLORS["base"] != COLORS["finetuned"]
    metrics = {"n": 5, "base": {"bleu": 10.0, "rougeL": 0.2}, "finetuned": {"bleu": 20.0, "rougeL": 0.3}}
    plot_metrics(metrics, tmp_path / "metrics.png")
    colours = {c for _, c in Image.open(tmp_path / "metrics.png").convert("RGB").getcolors(1 << 20)}
    assert rgb(COLORS["base"]) in colours and rgb(COLORS["finetuned"]) in colours


def test_the_demo_charts_give_each_model_its_colour():
    from app.demo_logic import chart, metrics_frame
    from desctune.evaluation.evaluate import COLORS

    tags = {f"metric.{m}_{k}": str(v) for m, v in (("base", 1.0), ("finetuned", 2.0)) for k in ("bleu", "rougeL")}
    frame, colours = chart(metrics_frame(tags), "BLEU")
    assert list(frame.columns) == ["base", "fine-tuned"] and list(frame.index) == ["BLEU"]
    assert colours == [COLORS["base"], COLORS["finetuned"]]
    assert metrics_frame({}, {"eval/base_bleu": 1.0, "eval/base_rougeL": 0.1, "eval/finetuned_bleu": 2.0,
                              "eval/finetuned_rougeL": 0.2}) is not None
