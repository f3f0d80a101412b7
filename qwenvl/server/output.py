"""Engine results in OpenAI's shapes: logprobs (chat's ``content`` list and completions' legacy object)
and tool-call deltas."""

from __future__ import annotations

from typing import Any

from ..engine.generate import TokenLogprob
from ..tokenizer import Tokenizer
from ..tools import ToolDelta

LOGPROB_FLOOR = -9999.0  # as vLLM: -inf (a token that cannot occur) is not JSON


def _value(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _token(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    data = tokenizer.token_bytes(token_id)
    return data.decode("utf-8", errors="replace"), list(data)


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` items: token, logprob, bytes and the top alternatives."""
    out = []
    for entry in entries:
        text, data = _token(tokenizer, entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            alt_text, alt_data = _token(tokenizer, token_id)
            top.append({"token": alt_text, "logprob": _value(logprob), "bytes": alt_data})
        out.append({"token": text, "logprob": _value(entry.logprob), "bytes": data, "top_logprobs": top})
    return out


class CompletionLogprobs:
    """The legacy ``logprobs`` object of /v1/completions, built piece by piece (``text_offset`` counts the
    characters of the returned text before each token, the echoed prompt included)."""

    def __init__(self, tokenizer: Tokenizer, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset

    def piece(self, entries: list[TokenLogprob | None], token_ids: list[int]) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text, _ = _token(self.tokenizer, token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if entry is None:  # the prompt's first token: nothing predicts it
                values.append(None)
                tops.append(None)
                continue
            values.append(_value(entry.logprob))
            tops.append({_token(self.tokenizer, i)[0]: _value(v) for i, v in entry.top})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def tool_call_delta(delta: ToolDelta) -> dict[str, Any]:
    """One ``delta.tool_calls`` item: the header (id, type, name, empty arguments) or a fragment."""
    if delta.name is not None:
        function = {"name": delta.name, "arguments": delta.arguments or ""}
        return {"index": delta.index, "id": delta.id, "type": "function", "function": function}
    return {"index": delta.index, "function": {"arguments": delta.arguments or ""}}
