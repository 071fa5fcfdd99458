"""Prometheus metrics and /healthz, served from the master's own loop."""
