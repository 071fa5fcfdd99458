"""forkproxy: a socket-activated prefork proxy that relays with splice(2)."""

__version__ = "0.1.0"
