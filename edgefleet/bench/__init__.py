"""Benchmarks: `edgefleet bench <name> [--quick] [--json FILE]`. Each measures its baseline in the same
run, prints a table, and writes JSON with a `goals` list (name, value, target, unit, met)."""
