"""Test helpers shared by the test modules, imported as `helpers.<module>` (conftest holds
only fixtures).

Nothing here is committed key material: every key and certificate is generated per test.
"""
