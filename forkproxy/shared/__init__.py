"""What the master and its workers share: scoreboard, admission, per-source table, protocol.

Both sides import it; it imports nothing of ours but settings.
"""
