"""Tokenize: chat-format examples with loss on the assistant answer only.

system -> user (the title) -> assistant (the description). Labels are -100 on the prompt and kept on the answer and
its end-of-turn token, so the model learns to stop. `prompt_ids` is also what evaluation and the demo generate from,
so training and generation see the same prompt, built by the same function from the same chat template.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa

from desctune.config import ModelConfig
from desctune.files import start_stage, write_parquet

IGNORE = -100  # the label of a position with no loss (PyTorch's cross-entropy ignore_index)
# The model settings that change the tokenized examples.
TOKENIZE_FIELDS = ("system_prompt", "max_seq_len")


def chat_messages(title: str, system_prompt: str, description: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": title}]
    if description is not None:
        messages.append({"role": "assistant", "content": description})
    return messages


def as_text(tokenizer, text: str) -> str:
    """Data is text: the string of any of the model's special tokens (`<|im_end|>`, `</s>`, ...) inside a title or a
    description is removed, so the data can never end a turn or open a new one."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(
        tokenizer.all_special_tokens)
    for special in specials:
        if special and special in text:
            text = text.replace(special, "")
    return text


def prompt_text(tokenizer, title: str, system_prompt: str) -> str:
    """The generation prompt: system and user turns plus the opened assistant turn."""
    messages = chat_messages(as_text(tokenizer, title), system_prompt)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, title: str, system_prompt: str) -> list[int]:
    return tokenizer(prompt_text(tokenizer, title, system_prompt), add_special_tokens=False)["input_ids"]


def completion_text(tokenizer, prompt: str, title: str, description: str, system_prompt: str) -> str:
    """The assistant answer as the template renders it after `prompt`, ending with the end-of-turn token."""
    messages = chat_messages(as_text(tokenizer, title), system_prompt, as_text(tokenizer, description))
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with an answer; cannot mask the prompt")
    answer = full[len(prompt):].rstrip()
    eos = tokenizer.eos_token
    if not answer.endswith(eos):
        answer += eos
    return answer


def encode_example(tokenizer, title: str, description: str, system_prompt: str, max_len: int) -> dict:
    """input_ids and labels (-100 on the prompt) for one record, or {"drop": reason}."""
    prompt = prompt_text(tokenizer, title, system_prompt)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text(tokenizer, prompt, title, description, system_prompt), add_special_tokens=False)[
        "input_ids"
    ]
    if len(p) >= max_len:
        return {"drop": "prompt_too_long"}
    truncated = len(p) + len(c) > max_len
    c = c[: max_len - len(p)]
    return {
        "input_ids": p + c,
        "labels": [IGNORE] * len(p) + c,
        "length": len(p) + len(c),
        "prompt_len": len(p),
        "truncated": truncated,
    }


def tokenize_frame(df: pd.DataFrame, tokenizer, cfg: ModelConfig) -> tuple[pd.DataFrame, Counter]:
    rows, drops = [], Counter()
    for uid, title, content in zip(df["uid"], df["title"], df["content"]):
        ex = encode_example(tokenizer, title, content, cfg.system_prompt, cfg.max_seq_len)
        if "drop" in ex:
            drops[ex["drop"]] += 1
            continue
        rows.append({"uid": uid, **ex})
    schema = pa.schema(
        [
            ("uid", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("length", pa.int32()),
            ("prompt_len", pa.int32()),
            ("truncated", pa.bool_()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema), drops


def tokenize_splits(splits: dict, base: dict, cfg: ModelConfig, out_dir: Path) -> dict:
    from desctune.models import load_tokenizer

    out_dir = start_stage(out_dir)
    tokenizer = load_tokenizer(base["path"])
    result: dict = {"tokenizer_path": base["path"]}
    for name in ("train", "val"):
        df = pd.read_parquet(splits[name]["path"], columns=["uid", "title", "content"])
        table, drops = tokenize_frame(df, tokenizer, cfg)
        if table.num_rows == 0:
            raise ValueError(f"every {name} example was dropped ({dict(drops)}): raise model.max_seq_len")
        path = out_dir / f"tokens_{name}.parquet"
        tokens = sum(table.column("length").to_pylist())
        result[name] = {
            "path": str(path),
            "sha256": write_parquet(table, path),
            "rows": table.num_rows,
            "dropped": dict(drops),
            "truncated": int(sum(table.column("truncated").to_pylist())),
            "tokens": int(tokens),
            "supervised_tokens": int(tokens - sum(table.column("prompt_len").to_pylist())),
        }
    return result

