"""forkproxy: a socket-activated prefork proxy that relays with splice(2)."""

__version__ = "0.2.0"
