"""The `dualproxy` command: `main` (the parser, exit codes, errors translated once), the
shared `arguments`, `running` (logging, Ctrl-C) and one module per command group.

The top layer: imports anything, and nothing imports it.
"""
