"""qwenvl: Qwen2-VL, Qwen2.5-VL and Qwen2/Qwen2.5 on a CPU.

import qwenvl
model = qwenvl.load("Qwen/Qwen2-VL-2B-Instruct")
print(model.chat([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import ChatResult, Model


def load(model: Any = None, **options: Any) -> Model:
    """Load a checkpoint directory, hub id or GGUF file; see ``qwenvl.api.load``."""
    from .api import load as _load

    return _load(model, **options)


__all__ = ["load", "Model", "ChatResult", "__version__"]
