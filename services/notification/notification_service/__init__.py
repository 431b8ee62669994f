"""The todo-mesh notification service."""

__version__ = "0.1.0"
