"""OpenAI-compatible HTTP server (``qwenvl serve``): see docs/serve.md."""

from .app import bind_socket, create_app, run_server, server_config
from .settings import ServerSettings

__all__ = ["bind_socket", "create_app", "run_server", "server_config", "ServerSettings"]
