"""Chat data: the template conversations are rendered with (`template_of`), the rendering, and which tokens
belong to the assistant's turns (the loss mask of data.loss_mask = 'assistant').
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import DataError


def template_of(cfg: DataConfig, tokenizer) -> tuple[str, str]:
    """The chat template rows are rendered with, and where it came from: data.chat_template (a template, or a file
    holding one: "config"), else the tokenizer's ("tokenizer")."""
    if cfg.chat_template is not None:
        t = cfg.chat_template
        if "{" not in t:  # not a template: a file holding one
            if not Path(t).is_file():
                raise DataError(f"data.chat_template {t!r} is neither a Jinja template nor an existing file")
            t = Path(t).read_text()
        return t, "config"
    t = tokenizer.chat_template
    if isinstance(t, dict):
        t = t.get("default")
    if not t:
        raise DataError(f"data.format = {cfg.format!r} renders conversations with the chat template, but the "
                        "teacher's tokenizer has none: set data.chat_template")
    return t, "tokenizer"


def render_conversation(tokenizer, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the template renders it, and the character spans of its assistant turns.

    An assistant turn spans from the end of the prompt the template renders before it (with the
    generation prompt) to the end of the rendering that includes it, so it covers the template's
    end-of-turn tokens too. A template that renders earlier turns differently once later ones
    exist falls back to locating the message's content.
    """
    def render(msgs, gen=False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=gen)
        except Exception as e:  # jinja's TemplateError, raise_exception(...) in the template, ValueError
            raise DataError(f"the chat template cannot render this conversation ({type(e).__name__}: {e}); "
                            f"roles: {[m['role'] for m in messages]}") from e

    full = render(messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], gen=True) if i else None  # nothing to render before a first turn
        through = render(messages[: i + 1])
        if before is not None and through.startswith(before) and full.startswith(through) and len(before) >= cursor:
            span = (len(before), len(through))
        else:
            at = full.find(m["content"], cursor)
            if at < 0:
                raise DataError(f"cannot find assistant message {i} in the rendered conversation (the chat "
                                "template changes it): its loss mask cannot be built")
            span = (at, at + len(m["content"]))
        spans.append(span)
        cursor = span[1]
    return full, spans


def trained_flags(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap an assistant span."""
    flags = [0] * len(offsets)
    j = 0
    for t, (a, b) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        if j < len(spans) and a < spans[j][1] and (b > spans[j][0] or (a == b and a >= spans[j][0])):
            flags[t] = 1  # overlaps the span; a token with trimmed (empty) offsets counts where it starts
    return flags
