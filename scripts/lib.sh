# Shared by scripts/dev and scripts/test: make a fresh clone runnable.
# Idempotent and quiet when everything is already in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

# The interpreter of the virtual environment: $PYTHON when given; else the distribution's
# python3 when it is 3.11 or later (what a server runs, and built for speed: profile-guided
# and link-time optimised, libpython linked in: on Debian 12 it ran Python code 1.5x faster
# than a default source build such as pyenv's, see benchmarks/README.md); else python3 on PATH.
choose_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo /usr/bin/python3
    else
        echo python3
    fi
}
PYTHON="$(choose_python)"
# Seconds between the "still installing" lines while the virtual environment is made.
SETUP_PROGRESS_EVERY="${SETUP_PROGRESS_EVERY:-15}"

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

# promtool (tests/test_deploy.py checks deploy/prometheus/ with it), from Debian's prometheus
# package: its binary alone, unpacked into the virtual environment, so that no Prometheus
# server is installed (or started by the package's scripts) on the machine.
ensure_promtool() {
    local tools="$VENV/tools"
    if command -v promtool >/dev/null 2>&1 || [[ -x "$tools/promtool" ]]; then
        return
    fi
    echo "setup: fetching promtool from Debian's prometheus package into $tools" >&2
    local sudo="" work
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    work="$(mktemp -d)"
    # apt-get download writes to the current folder, as a user that must be able to.
    chmod 0755 "$work"
    (cd "$work" && { apt-get download prometheus >/dev/null 2>&1 ||
        { $sudo apt-get update -qq && apt-get download prometheus >/dev/null; }; })
    mkdir -p "$tools"
    dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
    mv "$work/usr/bin/promtool" "$tools/promtool"
    rm -rf "$work"
}

# The virtual environment, pinned by constraints.txt; rebuilt only when the
# interpreter or the project's dependency files change.
ensure_venv() {
    ensure_commands "$PYTHON:python3" "git:git"
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        ensure_commands "false:python3-venv"
    fi
    local stamp="$VENV/.dualproxy-stamp"
    local want
    want="$(
        {
            "$PYTHON" -c 'import sys; print(sys.executable, sys.version)'
            cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt"
        } | sha256sum | cut -d' ' -f1
    )"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    # Said step by step: the first run takes a minute or two, silent it looks hung.
    local started=$SECONDS
    echo "setup: creating $VENV (first run, or the dependencies changed; later runs skip this)" >&2
    "$PYTHON" -m venv --clear "$VENV"  # --clear: one made by another interpreter goes
    echo "setup: installing dualproxy and its pinned dependencies (constraints.txt) into .venv;" \
        "this takes a minute or two" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]" &
    local pip=$!
    local next=$((SECONDS + SETUP_PROGRESS_EVERY))
    while kill -0 "$pip" 2>/dev/null; do
        if ((SECONDS >= next)); then
            echo "setup: still installing ($((SECONDS - started)) s so far)" >&2
            next=$((SECONDS + SETUP_PROGRESS_EVERY))
        fi
        sleep 1
    done
    wait "$pip"  # its exit status: under `set -e` a failed install stops here
    echo "$want" >"$stamp"
    echo "setup: .venv ready in $((SECONDS - started)) s" >&2
}
