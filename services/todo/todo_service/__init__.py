"""The todo-mesh todo service."""

__version__ = "0.1.0"
