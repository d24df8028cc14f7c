"""Apps and tools: the demo, the benchmarks and CLI commands. The only code that imports both
``train`` and ``serve``; nothing imports it."""
