"""A worker process and the hot path: accept, admit, connect, splice.

Never imports the supervisor: a worker knows its master only through `shared`.
"""
