"""desctune demo: the base and the fine-tuned model side by side, from one copy of the base weights.

Started by `desctune demo`, which passes the config and the starting model reference in the environment.
"""

from __future__ import annotations

import contextlib

import streamlit as st

from app import demo_logic as logic
from desctune.errors import UserError
from desctune.registry.modelref import NoRegisteredModel
from desctune.registry.modelref import resolve as resolve_ref
from desctune.tracking import client
from desctune.tracking import tracking_uri as uri_of

st.set_page_config(page_title="desctune demo", layout="wide", initial_sidebar_state="expanded")


@st.cache_resource(max_entries=1, show_spinner="Loading the base model and the adapter…")
def load_model(adapter_dir: str, artifacts_dir: str):
    """One copy of the base weights with the adapter on top, kept across reruns; status measured once."""
    from desctune.evaluation.generation import adapter_status, load_adapter_model

    model, tokenizer, meta = load_adapter_model(adapter_dir, artifacts_dir)
    return model, tokenizer, meta, adapter_status(model)


@st.cache_data(ttl=15, show_spinner=False)
def resolve(ref: str, tracking_uri: str, artifacts_dir: str):
    return resolve_ref(ref, tracking_uri, artifacts_dir)


@st.cache_data(show_spinner=False)
def load_examples(tracking_uri: str, run_id: str | None, artifacts_dir: str):
    return logic.examples(tracking_uri, run_id, artifacts_dir)


@st.cache_data(ttl=15, show_spinner=False)
def best_evaluation(tracking_uri: str, name: str | None, version: str | None, tags: dict, run_id: str | None,
                    run_metrics: dict):
    """The registry's largest evaluation of the version, looked up (a run search, a report download) at most every
    15 s rather than on each rerun of the page (every click and streamed output)."""
    return logic.best_evaluation(tracking_uri, name, version, tags, run_id, run_metrics)


def run_data(tracking_uri: str, run_id: str | None):
    """The MLflow run's metrics and params (empty for an adapter folder that was never registered)."""
    if run_id is None:
        return {}, {}
    data = client(tracking_uri).get_run(run_id).data
    return data.metrics, data.params


def pick_example() -> None:
    st.session_state.title = st.session_state.example


st.title("desctune — base vs fine-tuned")
try:
    cfg, start_ref = logic.demo_config()
except UserError as exc:
    st.error(str(exc))
    st.stop()

tracking_uri = uri_of(cfg)
start_ref, no_champion = logic.no_champion_fallback(start_ref, tracking_uri, cfg.registry.model_name)
if no_champion:
    st.warning(no_champion)
with st.sidebar:
    st.header("Model")
    choices = logic.model_choices(tracking_uri, cfg.registry.model_name)
    options = [start_ref] + [c for c in choices if c != start_ref]
    chosen = st.selectbox("Registered model", options, key="ref")
    shared = logic.shared()
    other = st.text_input("…or another registry reference" if shared else "…or another reference or an adapter folder",
                          key="other_ref", placeholder="models:/NAME/VERSION" + ("" if shared else " or path/to/adapter"))
    ref = other.strip() or chosen

refused = logic.refused_ref(other, shared)
if refused:
    st.error(refused)
    st.stop()

try:
    resolved = resolve(ref, tracking_uri, cfg.artifacts_dir)
except UserError as exc:
    if isinstance(exc, NoRegisteredModel):
        st.error(f"No model is registered yet ({ref}). Run `make run` first, then reload this page.")
    else:
        st.error(f"Cannot load {ref}: {exc}")
    st.stop()

try:
    model, tokenizer, meta, status = load_model(str(resolved.adapter_dir), cfg.artifacts_dir)
except UserError as exc:
    st.error(f"Cannot load {resolved.label}: {exc}")
    st.stop()

report = load_examples(tracking_uri, resolved.run_id, cfg.artifacts_dir)
run_metrics, run_params = run_data(tracking_uri, resolved.run_id)

with st.sidebar:
    st.header("Generation")
    max_new_tokens = st.slider("Max new tokens", 1, 512, int(run_params.get("eval/max_new_tokens", 128)),
                               help="defaults to the budget the model was evaluated with")
    mode = st.radio("Decoding", ["greedy", "sample"], horizontal=True)
    temperature = st.slider("Temperature", 0.05, 2.0, 0.7, step=0.05, disabled=mode == "greedy")
    top_p = st.slider("Top-p", 0.05, 1.0, 0.9, step=0.05, disabled=mode == "greedy")
    settings = logic.Settings(max_new_tokens, mode == "sample", temperature, top_p)

st.markdown(
    "**Loaded:** "
    + (resolved.label if resolved.version else f"adapter folder `{resolved.adapter_dir}` (not in the registry)")
    + (f" · MLflow run {logic.run_link(cfg, tracking_uri, resolved.run_id)}" if resolved.run_id else "")
    + f" · base model `{meta['base_model']['name']}`"
)
cols = st.columns(4)
cols[0].metric("Adapter loaded", "yes" if status["loaded"] else "NO")
cols[1].metric("Adapter active", "yes" if status["active"] else "NO")
cols[2].metric("LoRA parameters", f"{status['lora_parameters']:,}")
cols[3].metric("Target modules", len(status["target_modules"]))
st.caption("Target modules: " + (", ".join(status["target_modules"]) or "none"))
problems = logic.adapter_problems(status, report)
for problem in problems:
    st.error(problem, icon="🚨")
if not problems:
    st.success("Adapter loaded, active and non-zero: the fine-tuned column uses it, the base column turns it off.")

if len(report):
    st.selectbox("Example from the test split", report["title"].tolist(), index=None, key="example",
                 on_change=pick_example, placeholder="pick a title to try it")
title = st.text_input("Product title", key="title", placeholder="e.g. Stainless Steel Electric Kettle 1.7 L")
system_prompt = st.text_area("System prompt", meta["system_prompt"], height=80)

buttons = st.columns([1, 1, 6])
# Never disabled: a title typed but not yet committed (no Enter) reaches the script with the click that commits it.
generate = buttons[0].button("Generate", type="primary")
buttons[1].button("Stop", help="stop generating; what was written so far stays")  # a click reruns the page: that stops it
if generate and not title.strip():
    st.warning("Type a product title first.")
    generate = False
if generate:
    st.session_state.outputs = {"title": title, "base": "", "finetuned": "", "stats": {}, "done": []}

if st.session_state.get("outputs"):
    outputs = st.session_state.outputs
    boxes = {}
    for col, heading, name in zip(st.columns(2), ("Base model (adapter off)", "Fine-tuned (adapter on)"),
                                  ("base", "finetuned")):
        with col:
            st.subheader(heading)
            with st.container(border=True, key=f"{name}_output"):
                boxes[name] = st.empty()
            boxes[f"{name}_rate"] = st.empty()
    if generate:  # stream both, one after the other: the two columns share one copy of the weights
        for name in ("base", "finetuned"):
            with contextlib.closing(logic.stream(model, tokenizer, title, system_prompt, settings,
                                                 adapter=name == "finetuned")) as chunks:
                for text, tokens, seconds in chunks:
                    outputs[name], outputs["stats"][name] = text, (tokens, seconds)
                    boxes[name].text(text + " ▌")
                    boxes[f"{name}_rate"].caption(logic.rate_line(tokens, seconds))
            outputs["done"].append(name)
            boxes[name].text(outputs[name])  # finished: no cursor while the other column streams
    shown_title, base_out, tuned_out = outputs["title"], outputs["base"], outputs["finetuned"]
    for name, text in (("base", base_out), ("finetuned", tuned_out)):
        if not text:
            boxes[name].text("(empty output)" if name in outputs["done"] else "(stopped)")
        else:  # the claims the title cannot support, marked (desctune.evaluation.claims)
            marked, found = logic.highlight_claims(text, shown_title)
            boxes[name].markdown(marked, unsafe_allow_html=True)
        stats = logic.rate_line(*outputs["stats"][name], stopped=name not in outputs["done"]) \
            if name in outputs["stats"] else ""
        claims = (f"{len(found)} invented claim{'s' * (len(found) != 1)}: " + "; ".join(found)) if text and found \
            else "no invented claim found" if text else ""
        boxes[f"{name}_rate"].caption(" · ".join(x for x in (stats, claims) if x))
    finished = outputs["done"] == ["base", "finetuned"]
    if finished and base_out == tuned_out:
        st.error("The base and fine-tuned outputs are identical for this title: the adapter had no effect here.",
                 icon="🚨")
    match = report[report["title"] == shown_title] if len(report) else report
    if len(match):
        with st.expander("Reference description from the test split", expanded=True):
            st.text(match["reference"].iloc[0])

st.header("Evaluation")
# the registry's most trustworthy evaluation of this version: the one that scored the most examples
evaluation, evaluations = best_evaluation(tracking_uri, resolved.name, resolved.version, resolved.tags,
                                          resolved.run_id, run_metrics)
figures = evaluation.tags if evaluation else resolved.tags
metrics = logic.metrics_frame(figures, evaluation.metrics if evaluation else run_metrics)
if metrics is None:
    st.info("No evaluation metrics recorded for this model.")
else:
    if evaluation:
        st.caption(evaluation.scored_on(logic.run_link(cfg, tracking_uri, evaluation.run_id), evaluations))
    for line in [*logic.significance(figures), logic.claims_line(figures)]:
        if line:
            st.markdown(f"- {line}")
    scales = {"BLEU": "corpus BLEU (0–100)", "ROUGE-L": "ROUGE-L F (0–1)", "chrF++": "chrF++ (0–100)"}
    shown = [c for c in scales if c in metrics.columns]
    for column, place in zip(shown, st.columns(len(shown))):
        with place:
            st.caption(scales[column])
            frame, colors = logic.chart(metrics, column)
            st.bar_chart(frame, color=colors, stack=False, horizontal=True, height=180)
    st.dataframe(metrics.style.format({"BLEU": "{:.2f}", "ROUGE-L": "{:.4f}", "chrF++": "{:.2f}"}))
if len(report):
    with st.expander(f"Test-split examples ({len(report)})"):
        st.dataframe(report[[c for c in ("title", "reference", "base_output", "finetuned_output") if c in report]],
                     hide_index=True)
