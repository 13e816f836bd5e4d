"""Benchmarks (`mugbench bench ...`): speed and memory measured side by side in one run, never
asserted in tests."""
