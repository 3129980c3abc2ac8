"""dualproxy: a TLS-terminating reverse proxy that keeps pinned apps working.

It owns the TLS key (renewals keep it, so pins survive) and, when the key itself must change,
serves the old and the new certificate side by side during a grace window, choosing per
connection from the ClientHello. See README.md and config.toml.
"""

__version__ = "0.1.0"
