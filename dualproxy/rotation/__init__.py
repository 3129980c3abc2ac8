"""The rotation: which key a client gets and why (`policy`), and what `check` says of a plan.

Layer 3: pure, no I/O; imports `config` and `tls` (ClientHello, pins) only.
"""
