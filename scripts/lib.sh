# Shared by scripts/dev and scripts/test: make a fresh clone runnable.
# Idempotent and quiet when everything is already in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

# Debian packages the given commands come from; installed only when missing.
ensure_commands() {
    local missing=()
    local cmd pkg
    for spec in "$@"; do
        cmd="${spec%%:*}"
        pkg="${spec#*:}"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "setup: installing system packages: ${missing[*]}" >&2
        local sudo=""
        [[ $(id -u) -eq 0 ]] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The virtual environment, pinned by constraints.txt; rebuilt only when the
# project's dependency files change.
ensure_venv() {
    ensure_commands "$PYTHON:python3" "git:git"
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        ensure_commands "false:python3-venv"
    fi
    local stamp="$VENV/.dualproxy-stamp"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]"
    echo "$want" >"$stamp"
}
