"""edgecam's fleet manager and operator CLI."""

__version__ = "0.1.0"
