"""Serving: engine (prefill / insert / generate), decode pool, router, scheduler, loop."""
