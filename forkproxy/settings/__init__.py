"""Settings: the command line to a frozen `Config`. Pure: no I/O, no sockets, no processes."""
