"""The server: listeners, the per-connection pipeline, drain, reload and file watching.

Layer 7: trio and sockets; imports every layer below it. Services that run beside a server
(ACME renewals, the dev bench) live above it and reach in through small protocols.
"""
