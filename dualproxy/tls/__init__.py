"""TLS: the ClientHello peek, the key store and its SSL contexts, new keys, pins, our own
streams, and how a connection ended (`outcome`).

Layer 2 of the house (see docs/architecture.md): imports `config` and `files` only. Parsers
here are pure; `keygen` names the key types and makes keys and CSRs; `keystore` reads key
files and builds OpenSSL contexts; `streams` is the socket and TLS edge every listener uses.
"""
