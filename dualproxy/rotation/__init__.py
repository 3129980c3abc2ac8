"""The rotation: which key a client gets and why (`policy`), what `check` says of a plan
(`checks`), and the rotation told to people (`explain`: why a choice, the timeline, pin roles).

Layer 3: pure, no I/O; imports `config` and `tls` (ClientHello, pins, loaded keys) only.
"""
