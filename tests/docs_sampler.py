"""The docs test's next-token choice: where an output grammar masks the vocabulary (a tool call, a JSON
schema, a choice), take the first allowed of a few closing tokens (end of turn, a closing quote or
brace) before sampling. The tiny test checkpoints have random weights: left alone, they would fill a
JSON string until max_tokens and the examples that read the answer as JSON could not run. And an
answer ends (end of turn) after ANSWER_TOKENS tokens where the grammar lets it, so that the examples
without max_tokens take seconds. Everything else (prompts, grammar, detokenization, the server, the
clients) runs as usual."""

from __future__ import annotations

from typing import Any

CLOSING_TEXTS = ('"}', '"', "}", "]")
ANSWER_TOKENS = 24


def closing_tokens(tokenizer: Any, eos: int) -> list[int]:
    """End of turn first, then the closing quotes and braces, as single tokens of this vocabulary."""
    tokens = [eos]
    for text in CLOSING_TEXTS:
        ids = tokenizer.encode(text)
        if len(ids) == 1:
            tokens.append(ids[0])
    return tokens


def closing_sampler(base: type, preferred: list[int]) -> type:
    """A subclass of the engine's Sampler that prefers ``preferred`` tokens where a grammar masks the logits."""
    import torch

    class ClosingSampler(base):
        def __call__(self, logits: Any, history: Any, generated: Any = None) -> int:
            eos = preferred[0]
            if generated is not None and generated.numel() >= ANSWER_TOKENS and torch.isfinite(logits[eos]):
                return eos
            if torch.isinf(logits).any():  # a grammar's mask is on
                for token in preferred:
                    if token < logits.shape[0] and torch.isfinite(logits[token]):
                        return token
            return super().__call__(logits, history, generated)

    return ClosingSampler


def install(preferred: list[int]) -> None:
    """Use the ClosingSampler for every request created from now on, in this process."""
    import qwenvl.engine.generate as generate

    generate.Sampler = closing_sampler(generate.Sampler, preferred)
