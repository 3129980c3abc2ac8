"""What operators see: rollout evidence and the canary's halt rule, Prometheus metrics, the
status page, the admin listener, log formats.

Layer 6: pure accounting and rendering, plus the admin listener; imports the layers below it,
never `serve`: the admin listener reaches the server through a protocol.
"""
