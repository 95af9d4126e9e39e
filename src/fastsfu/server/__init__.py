"""The standalone server: command line, demo configuration, stats printing (the I/O edge)."""
