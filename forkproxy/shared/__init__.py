"""What the master and its workers share: the mapping (its layout, the scoreboard, the
caps, the per-source table), and their protocol.

Both sides import it; it imports nothing of ours but settings.
"""
