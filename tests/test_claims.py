"""The invented-claims detector on the outputs that made it necessary, its rates and intervals, and the registry's
claims rule on a real MLflow store."""

import pandas as pd

from conftest import tiny_config
from desctune.evaluation.claims import KINDS, claim_summary, describe, find_claims
from desctune.evaluation.evaluate import markdown_report, score, score_claims
from desctune.registry.register import gate
from desctune.tracking import client, tracking_uri
from test_evaluate import save_adapter
from test_register import register, stages_for


def kinds(text: str, title: str) -> list[tuple[str, str]]:
    return [(c.kind, c.text.strip()) for c in find_claims(text, title)]


def test_invented_people_works_and_counts_are_flagged_by_kind():
    found = kinds('Collins is a leading authority on language and literature. He is the author of 12 books, including '
                  '"The Complete Illustrated Dictionary of World Literature" and more.',
                  "Collins COBUILD Learner's Dictionary")
    assert found == [("number", "12 books"),
                     ("entity", '"The Complete Illustrated Dictionary of World Literature"')]
    found = kinds("In this fourth book, Harry Potter returns to Hogwarts School of Witchcraft and Wizardry. A New York "
                  "Times bestseller. --Kirkus Reviews", "Harry Potter and the Goblet of Fire")
    assert found == [("entity", "Hogwarts School of Witchcraft and Wizardry"), ("praise", "New York Times bestseller"),
                     ("praise", "--Kirkus Reviews")]


def test_quoted_praise_attributions_and_boilerplate_are_flagged():
    blurb = ("'Carr's comic timing works every bit as well on the page as it does on stage.' Independent 'joyous "
             "stuff that anyone can relate to.' Sunday Express")
    assert [k for k, _ in kinds(blurb, "Look Who it Is!: My Story")] == ["praise", "praise"]
    text = "A history of the paper. Copyright 2005 Reed Business Information, Inc. --This text refers to the edition."
    assert kinds(text, "A Paper History") == [("boilerplate", "Copyright 2005 Reed Business Information"),
                                              ("boilerplate", "This text refers to the")]


def test_what_the_title_says_is_no_claim():
    assert kinds("The Times Killer Su Doku is a book of 150 puzzles from The Times.", "The Times Killer Su Doku 150") \
        == []
    assert kinds("These socks come in a 3-pack for everyday wear.", "Brand X 3-Pack Socks") == []
    assert kinds("A 12 oz ceramic mug in Bright Blue.", "Bright Blue Ceramic Coffee Mug 12 oz") == []
    # a sentence's opening word and spec acronyms name nothing
    assert kinds("Perfect Gift for the holidays. Connects over USB HDMI.", "Gift Box") == []


def test_numbers_with_units_not_in_the_title_are_flagged():
    found = kinds("It has 40 hours of battery life, a 500mAh cell and weighs 1,200 grams; 2 year warranty.",
                  "Wireless Bluetooth Headphones Over Ear 40 Hours")
    assert found == [("number", "500mAh"), ("number", "1,200 grams"), ("number", "2 year")]


def test_rates_and_the_paired_interval_of_fine_tuned_minus_base():
    titles = [f"Plain Mug {i}" for i in range(40)]
    base = ["A mug for coffee."] * 40
    tuned = ["A mug. Winner of the Pulitzer Prize."] * 20 + ["A mug for tea."] * 20
    summary, flags = claim_summary(titles, {"base": base, "finetuned": tuned}, references=base)
    assert summary["rates"]["base"]["any"] == 0 and summary["rates"]["finetuned"]["any"] == 0.5
    assert summary["rates"]["finetuned"]["praise"] == 0.5 and summary["rates"]["reference"]["any"] == 0
    assert set(summary["rates"]["base"]) == {"any", *KINDS}
    iv = summary["comparison"]["any"]
    assert iv["delta"] == 0.5 and iv["low"] > 0.3 and iv["verdict"] == "more claims"
    assert describe(summary).startswith("invented claims: base 0% → fine-tuned 50%, +50 pts [+")
    assert len(flags["finetuned"][0]) == 1 and flags["base"][0] == []


def test_the_report_and_the_table_show_each_flagged_span_with_its_kind():
    refs = ["A sturdy mug for hot drinks every day."] * 4
    outputs = {"base": ["A mug."] * 4, "finetuned": ["A mug, 16 oz. Praised by Publishers Weekly."] * 4}
    df, metrics = score(refs, outputs)
    df.insert(0, "title", ["Blue Mug"] * 4)
    score_claims(df, metrics)
    assert '"kind": "number"' in df.at[0, "finetuned_claims"] and df.at[0, "base_claims"] == "[]"
    report = markdown_report(metrics, df)
    assert "### Invented claims" in report and "| any kind | 0% | 100% | 0% | +100 pts" in report
    assert "number: 16 oz; praise: Publishers Weekly" in report


def test_the_claims_rule_keeps_a_better_scoring_version_with_more_claims_challenger():
    beats = {"rougeL": 0.4}, {"rougeL": 0.2}, None, "rougeL"
    sure = {"delta": 0.2, "low": 0.1, "high": 0.3}
    more = {"delta": 0.3, "low": 0.1, "high": 0.5, "rate": 0.4, "against": "the base", "against_rate": 0.1}
    promoted, why = gate(*beats, base_interval=sure, claims=more)
    assert not promoted and why.startswith("stays challenger by the claims rule: invented claims 40% against the "
                                           "base's 10%, +30 pts [+10, +50], 95% CI")
    assert gate(*beats, base_interval=sure, claims=more, max_claim_increase=0.15)[0]  # within the allowed margin
    fewer = {**more, "delta": -0.1, "low": -0.2, "high": 0.0, "rate": 0.0}
    promoted, why = gate(*beats, base_interval=sure, claims=fewer)
    assert promoted and why.endswith("invented claims 0% against the base's 10%, -10 pts [-20, +0], 95% CI, not "
                                     "significantly more")


def _with_claims(stages: dict, titles: list[str], base: list[str], tuned: list[str]) -> dict:
    """`stages` whose evaluation table and metrics hold these titles and outputs, and their claims."""
    path = stages["evaluate"]["eval_path"]
    table = pd.read_parquet(path).assign(title=titles, base_output=base, finetuned_output=tuned)
    table.to_parquet(path)
    stages["evaluate"]["metrics"]["claims"] = claim_summary(titles, {"base": base, "finetuned": tuned})[0]
    return stages


def test_the_registry_keeps_a_version_with_more_claims_than_the_champion_challenger(tmp_path, tiny_model_dir):
    """On a real store: a first version with a sure ROUGE-L gain but far more invented claims than its base stays
    challenger and its champion_gate tag names the claims rule; a claim-free one becomes champion; a later version that
    beats that champion on every record but invents claims the champion did not is kept out too."""
    cfg = tiny_config(tmp_path, tiny_model_dir, registry={"model_name": "tiny-claims"})
    adapters = [save_adapter(tiny_model_dir, tmp_path / f"run{i}" / "adapter", seed=40 + i) for i in range(3)]
    n = 20
    titles = [f"Plain Mug {i}" for i in range(n)]
    plain = ["A mug for coffee and tea."] * n
    invented = ["A mug for coffee. A New York Times bestseller, 300 pages."] * n
    first = register(cfg, _with_claims(stages_for(adapters[0], tiny_model_dir, 0.4, per_example=[0.4] * n),
                                       titles, plain, invented))
    assert not first["promoted"] and first["decision"].startswith("stays challenger by the claims rule: invented "
                                                                  "claims 100% against the base's 0%")
    c = client(cfg)
    assert c.get_model_version("tiny-claims", first["version"]).tags["champion_gate"] == first["decision"]
    # the demo, asked for @champion while there is none, opens on @challenger and says why
    from app.demo_logic import no_champion_fallback

    ref, note = no_champion_fallback("models:/tiny-claims@champion", tracking_uri(cfg), "tiny-claims")
    assert ref == "models:/tiny-claims@challenger" and first["decision"] in note
    tags = c.get_model_version("tiny-claims", first["version"]).tags
    assert float(tags["metric.claims_finetuned"]) == 1.0 and float(tags["metric.claims_base"]) == 0.0
    second = register(cfg, _with_claims(stages_for(adapters[1], tiny_model_dir, 0.4, per_example=[0.4] * n),
                                        titles, plain, plain))
    assert no_champion_fallback("models:/tiny-claims@champion", tracking_uri(cfg), "tiny-claims") == (
        "models:/tiny-claims@champion", None)
    assert second["promoted"] and second["decision"].endswith("invented claims 0% against the base's 0%, +0 pts "
                                                              "[+0, +0], 95% CI, not significantly more")
    third = register(cfg, _with_claims(stages_for(adapters[2], tiny_model_dir, 0.5, per_example=[0.5] * n),
                                       titles, plain, invented))
    assert not third["promoted"]
    assert third["decision"].startswith(f"stays challenger by the claims rule: invented claims 100% against champion "
                                        f"version {second['version']}'s 0%")


def test_the_demo_marks_each_claim_and_escapes_the_rest():
    from app.demo_logic import highlight_claims

    marked, found = highlight_claims("<b>A mug</b>, 16 oz. Loved by Kirkus Reviews.", "Blue Mug")
    assert found == ["number: 16 oz", "praise: Kirkus Reviews"]
    assert "&lt;b&gt;A mug&lt;/b&gt;" in marked and "<b>" not in marked
    assert '<mark class="claim claim-number" title="number with a unit"' in marked and ">16 oz</mark>" in marked
    assert highlight_claims("A plain mug.", "Blue Mug")[1] == []


def test_the_detector_keeps_its_precision_and_recall_on_the_outputs_labelled_by_reading():
    """280 real outputs of the default champion and its base (held-out file and Abt file), labelled by readers blind
    to the model and the detector (tests/data/claims_labels.jsonl; figures in docs/evaluation.md). The floors sit a
    little under what the detector scores now, so a change that makes it worse fails here."""
    from bench.claims import detector_scores, load

    rows = load()
    assert len(rows) >= 150 and {r["source"] for r in rows} == {"heldout", "abt"}
    assert {r["model"] for r in rows} == {"base", "finetuned"}
    scores = detector_scores(rows)
    floors = {"any": (0.80, 0.68), "number": (0.85, 0.85), "entity": (0.70, 0.48), "praise": (0.6, 0.6)}
    for kind, (precision, recall) in floors.items():
        assert scores[kind]["precision"] >= precision and scores[kind]["recall"] >= recall, (kind, scores[kind])
