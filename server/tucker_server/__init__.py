"""tucker-serve HTTP server: OpenAI-compatible routes over vLLM's AsyncLLM, with KV-memory metrics."""
