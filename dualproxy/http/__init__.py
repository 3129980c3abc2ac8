"""HTTP: strict heads, header rewriting, body framing, the exchange, the relay and its
upstream pool.

Pure (bytes and values in, values out; no trio): `errors` (HttpRefusal, the one HTTP error),
`fields` (the shared field vocabulary), `heads` (find, check and write message heads),
`rewrite` (the proxy's header rewriting), `body` (body framing), `exchange` (what one request
and its response mean). On trio: `upstream` (the pool of upstream connections), `lifecycle`
(the drain and the departure watch), `relay` (the HTTP/1.1 driver of the exchange).

Imports `config`, `tls` and `rotation`; `relay` also imports `pinning.endpoints` for the
local endpoints it answers (`exchange` sees them only through its LocalRoutes protocol).
"""
