#!/usr/bin/env bash
# Local Prefect server + process worker for tok1d, on 127.0.0.1.
#   deployments/local.sh start   start the server, create the work pool, deploy, start a worker
#   deployments/local.sh stop    stop the worker, then the server
#   deployments/local.sh status  show the pids and the UI address
# Environment: TOK1D_PORT (4200), TOK1D_STORE (<repo>/store), TOK1D_PREFECT_HOME (<repo>/.prefect-local),
# TOK1D_PYTHON (the venv's python).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
port="${TOK1D_PORT:-4200}"
export TOK1D_HOME="$repo"
export TOK1D_STORE="$(realpath -m "${TOK1D_STORE:-$repo/store}")"
export PREFECT_HOME="${TOK1D_PREFECT_HOME:-$repo/.prefect-local}"
export PREFECT_API_URL="http://127.0.0.1:$port/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_HUB_OFFLINE=1
python="${TOK1D_PYTHON:-$repo/.venv/bin/python}"
bin="$(dirname "$python")"
mkdir -p "$PREFECT_HOME"

wait_for_server() {
  for _ in $(seq 1 120); do
    if "$python" -c "import urllib.request,sys; urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "server did not answer on $PREFECT_API_URL; see $PREFECT_HOME/server.log" >&2
  return 1
}

case "${1:-}" in
  start)
    setsid "$bin/prefect" server start --host 127.0.0.1 --port "$port" >"$PREFECT_HOME/server.log" 2>&1 &
    echo $! >"$PREFECT_HOME/server.pid"
    wait_for_server
    "$bin/prefect" work-pool create tok1d-local --type process --overwrite >/dev/null
    (cd "$repo" && "$bin/prefect" --no-prompt deploy --all --prefect-file deployments/prefect.yaml) >"$PREFECT_HOME/deploy.log" 2>&1 \
      || { cat "$PREFECT_HOME/deploy.log" >&2; exit 1; }
    setsid "$bin/prefect" worker start --pool tok1d-local --type process >"$PREFECT_HOME/worker.log" 2>&1 &
    echo $! >"$PREFECT_HOME/worker.pid"
    echo "Prefect UI: http://127.0.0.1:$port   store: $TOK1D_STORE"
    echo "run: PREFECT_API_URL=$PREFECT_API_URL prefect deployment run full-pipeline/default"
    ;;
  stop)
    # The worker first: a server stopped under a live worker leaves runs stuck in Running.
    for name in worker server; do
      if [ -f "$PREFECT_HOME/$name.pid" ]; then
        pid="$(cat "$PREFECT_HOME/$name.pid")"
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$PREFECT_HOME/$name.pid"
      fi
    done
    ;;
  status)
    for name in server worker; do
      pid="$(cat "$PREFECT_HOME/$name.pid" 2>/dev/null || true)"
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
    done
    echo "UI: http://127.0.0.1:$port"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
