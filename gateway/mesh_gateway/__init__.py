"""The todo-mesh API gateway."""

__version__ = "0.1.0"
