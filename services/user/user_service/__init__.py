"""The todo-mesh user service."""

__version__ = "0.1.0"
