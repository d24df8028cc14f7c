"""Apps and tools over the library: the demo, the benchmarks, the cluster simulator, CLI
commands. The only code that may import both ``train`` and ``serve`` (DESIGN.md section 3);
nothing imports it."""
