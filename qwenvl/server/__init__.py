"""OpenAI-compatible HTTP server (``qwenvl serve``): see docs/serve.md."""

from .app import create_app, run_server, server_config
from .settings import ServerSettings

__all__ = ["create_app", "run_server", "server_config", "ServerSettings"]
