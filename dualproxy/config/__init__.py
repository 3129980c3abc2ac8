"""The configuration: config.toml read strictly into frozen dataclasses.

`schema` (the dataclasses and their defaults), `loader` (load and parse: every value
checked, each rejection an `OperatorError` naming the file, the key path and what to do),
`names` (host names, key names, listen addresses, networks), `times` (ISO 8601 instants),
`errors` (the operator's error). Layer 1: it imports nothing else of dualproxy (only
`files`, atomic writes, sits below it, for the layers that write).
"""
