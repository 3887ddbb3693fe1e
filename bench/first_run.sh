#!/usr/bin/env bash
# A newcomer's first `make serve`, timed: a fresh clone of this repository's committed HEAD, empty
# pip and tucker-serve caches, `make serve` until /health answers, then the README's chat question
# at temperature 0. Writes first_run.json (seconds to healthy, the answer) to the folder given.
#   bench/first_run.sh runs/first-run
set -euo pipefail
out=$(realpath -m "${1:-runs/first-run}")
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d /tmp/tucker-first-run.XXXXXX)
mkdir -p "$out"
git clone -q "$repo" "$work/clone"
export TUCKER_SERVE_CACHE="$work/cache" PIP_NO_CACHE_DIR=1 XDG_CACHE_HOME="$work/xdg"
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
start=$(date +%s)
(cd "$work/clone" && exec make serve ARGS="--port $port") > "$out/make-serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; pkill -f "tucker-first-run" 2>/dev/null; rm -rf "$work"' EXIT
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 $server 2>/dev/null || { echo "make serve exited; see $out/make-serve.log" >&2; exit 1; }
    sleep 2
done
ready=$(( $(date +%s) - start ))
answer=$(curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2-135m-tucker", "temperature": 0, "max_tokens": 48,
         "messages": [{"role": "user", "content": "What is the capital of France?"}]}')
python3 - "$ready" "$answer" "$out/first_run.json" "$(git -C "$repo" rev-parse HEAD)" <<'EOF'
import json, sys
ready, answer, path, commit = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
text = answer["choices"][0]["message"]["content"]
result = {"commit": commit, "seconds_to_healthy": ready, "answer": text,
          "finish_reason": answer["choices"][0]["finish_reason"], "mentions_paris": "paris" in text.lower()}
open(path, "w").write(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
EOF
