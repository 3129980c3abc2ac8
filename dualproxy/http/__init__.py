"""HTTP: strict heads, header rewriting, body framing, the exchange, the relay and its
upstream pool.

Layer 4: the codec and the exchange are pure (bytes and values in, values out); the relay
driver and the upstream pool run on trio. Imports `config`, `tls` and `rotation` only.
"""
