"""Parsers of untrusted file content in worker processes: the pool the
daemon uses (pool), the worker's main loop and confinement (worker), and
the pipe protocol between them (protocol)."""
