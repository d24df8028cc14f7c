"""Benchmarks, each ``sunjax bench NAME`` (``sunjax.cli.BENCHES``): scripts that print a table
and write JSON."""
