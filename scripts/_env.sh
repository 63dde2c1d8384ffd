# Sourced by the scripts: repo root, virtual environment, and a quick, idempotent setup.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VIDEOGEN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

setup_env() {
  local python="${PYTHON:-python3}"
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "videogen needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    return 1
  fi
  [ -x "$PY" ] || { echo "creating $VENV" >&2; "$python" -m venv "$VENV"; }
  local want; want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
  if [ "$(cat "$VENV/.videogen-installed" 2>/dev/null)" != "$want" ]; then
    # torch first, and only if missing: any CUDA or CPU build satisfies the project
    # (torch>=2.5); VIDEOGEN_TORCH_SPEC picks which one a fresh environment gets.
    if ! "$PY" -c 'import torch' 2>/dev/null; then
      echo "installing ${VIDEOGEN_TORCH_SPEC:-torch==2.13.0}" >&2
      "$PY" -m pip install -q --disable-pip-version-check "${VIDEOGEN_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" >&2 || true
    fi
    echo "installing videogen[dev]" >&2
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]" 2>&1 | grep -v "is ignored" >&2 || true
    "$PY" -c 'import gateway, worker, schemas, torch, diffusers, aio_pika, minio, av' \
      || { echo "setup failed: see the pip output above" >&2; return 1; }
    echo "$want" > "$VENV/.videogen-installed"
  fi
}

# Tools two tests need: the web page's test drives a real headless Chromium, and the Compose
# file's test asks Compose to validate it. Install Debian's packages of those that are missing
# when this user may (the tests say what to do otherwise).
ensure_test_tools() {
  local missing=()
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
    || [ -n "${VIDEOGEN_CHROMIUM:-}" ] || missing+=(chromium)
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (for the browser and Compose tests)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
      || echo "could not install ${missing[*]}; the browser test fails and the Compose check is skipped without them" >&2
  fi
}
