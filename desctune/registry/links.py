"""Links in the texts MLflow renders as Markdown (run and version descriptions) and in model cards."""

from __future__ import annotations

import re


def md_link(text: str, url: str) -> str:
    """`[text](url)`: a Markdown link. Written out bare, a URL in parentheses is auto-linked with the closing ")"
    inside it; brackets in `text` and "(", ")" or blanks in `url` are escaped so neither can end the link early."""
    text = re.sub(r"([\\\[\]])", r"\\\1", text)
    url = url.replace(" ", "%20").replace("(", "%28").replace(")", "%29")
    return f"[{text}]({url})"
