"""One module per benchmark phase; `llmstack.bench.phase` is their registry."""
