"""The master process: activation, listeners, workers, signals, readiness, metrics.

The only code that forks. Never relays a byte.
"""
