"""HTTP: strict heads, header rewriting, body framing, the exchange, the relay and its
upstream pool, and the small servers' helper.

Pure (bytes and values in, values out; no trio): `errors` (HttpRefusal, the one HTTP error),
`fields` (the shared field vocabulary), `heads` (find, check and write message heads),
`rewrite` (the proxy's header rewriting), `body` (body framing), `exchange` (what one request
and its response mean), `local` (the requests dualproxy answers itself, as HTTP sees them).
On trio: `upstream` (the pool of upstream connections), `lifecycle` (the drain and the
departure watch), `relay` (the HTTP/1.1 driver of the exchange), `smallserver` (h11 for the
admin listener, the dev bench's control endpoint, the http-01 listener and the placeholder).

Layer 4: imports `config`, `tls` and `rotation` only; the local endpoints (`pinning`) are
reached through `local`'s protocols.
"""
