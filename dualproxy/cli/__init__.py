"""The `dualproxy` command: argument parsing and one handler per command.

The top layer: imports anything, and nothing imports it.
"""
