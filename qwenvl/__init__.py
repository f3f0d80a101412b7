"""qwenvl: Qwen2-VL, Qwen2.5-VL and Qwen2/Qwen2.5 on a CPU.

import qwenvl
model = qwenvl.load("Qwen/Qwen2-VL-2B-Instruct")
print(model.chat([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that wait for work by spinning keep a core that another process may need: on a busy
# machine each parallel region then waits for a spinning thread's time slice (a decode step of the
# registry model at 0.4 tok/s instead of 22 with both cores busy elsewhere). So threads wait
# passively unless the user chose a policy. libgomp reads it when torch loads it: this applies where
# qwenvl is imported before torch (the CLI, the server, `import qwenvl` first); docs/engine.md.
OMP_WAIT_POLICY_FROM_ENVIRONMENT = "OMP_WAIT_POLICY" in os.environ  # what `qwenvl info` / serve say
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import ChatResult, Model

_LAZY = ("Model", "ChatResult")  # from .api, imported on first use: ``import qwenvl`` stays light


def load(model: Any = None, **options: Any) -> Model:
    """Load a checkpoint directory, hub id or GGUF file; see ``qwenvl.api.load``."""
    from .api import load as _load

    return _load(model, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qwenvl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["load", "Model", "ChatResult", "__version__"]
