"""What apps talk to besides the API: the signed pin manifest and pin-failure reports, and
the endpoints that answer both on the TLS listener.

Layer 5: imports `config`, `tls`, `rotation` and `http`.
"""
