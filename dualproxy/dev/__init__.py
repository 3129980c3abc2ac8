"""The local pinning test bench (`dualproxy dev`): its CA and keys, scenarios, control
endpoint and echo upstream.

Layer 8, beside `acme`: may use anything below; production code never imports it.
"""
