"""ACME (RFC 8555): certificates for our own keys, their challenges and when to renew.

Layer 8, beside `dev`: a service started next to the server; the handshake path knows it only
through the tls-alpn-01 responder protocol that `serve` defines.
"""
