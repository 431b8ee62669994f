"""The native stack: every real part of todo-mesh as local processes.

Docker Compose runs the same system from compose.yml where a Docker engine
answers; this package runs it without one, with data, logs and pid files
under a git-ignored run directory.
"""
