"""The shared library of todo-mesh: only what every service needs, no business logic."""
