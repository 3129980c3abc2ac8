"""The configuration: config.toml read strictly into frozen dataclasses.

`schema` (the dataclasses and their defaults), `loader` (load and parse: every value
checked, each rejection a `OperatorError` naming the file, the key path and what to do),
`names` (host names, key names, listen addresses, networks), `times` (ISO 8601 instants),
`errors` (the operator's error). The lowest layer: it imports nothing else of dualproxy.
"""
