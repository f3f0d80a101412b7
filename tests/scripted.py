"""A sampler that answers a scripted token sequence, for tests of what happens to an answer's text
(grounding, escaping in the chat page) on a real model and server: prompts, vision encoding, prefill,
decoding, detokenization and streaming all run; only the choice of each next token is scripted.
The tiny test checkpoints have random weights, so they never write a box on their own."""

from __future__ import annotations

from typing import Any

import pytest


def script_answer(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, text: str, eos: int = 151645) -> list[int]:
    """Make every request created from now on (until ``monkeypatch`` undoes it) answer ``text``, then EOS.

    Returns the scripted ids (special-token text such as ``<|box_start|>`` becomes its token)."""
    import qwenvl.engine.generate as generate

    script = tokenizer.encode(text) + [eos]

    class ScriptedSampler:
        def __init__(self, params: Any):
            self.params = params

        def __call__(self, logits: Any, history: Any, generated: Any = None) -> int:
            done = 0 if generated is None else int(generated.numel())
            return script[min(done, len(script) - 1)]

    monkeypatch.setattr(generate, "Sampler", ScriptedSampler)
    return script
