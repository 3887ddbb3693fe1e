"""tucker-serve's additions to vLLM's OpenAI server, each through one of vLLM's extension points.

- `endpoint`: GET /v1/memory (entry point `vllm.endpoint_plugins`, loaded when VLLM_PLUGINS names `tucker`);
- `stat_logger`: the tucker_kv_* gauges on vLLM's /metrics (entry point `vllm.stat_logger_plugins`);
- `middleware`: API key on every path and a request-body limit (vLLM's `--middleware`);
- `launcher`: `tucker-serve serve`, which resolves or converts the model, then runs vLLM's server.
"""
