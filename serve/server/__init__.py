"""The OpenAI-compatible server: ``build_app(runtime)`` over the engine thread's ``Runtime``."""

from serve.server.app import build_app
from serve.server.errors import APIError, to_error
from serve.server.runtime import Runtime

__all__ = ["APIError", "Runtime", "build_app", "to_error"]
