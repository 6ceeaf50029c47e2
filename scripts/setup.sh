# Shared set-up for scripts/test and scripts/demo: sourced, not run. Idempotent: each
# step does nothing when its work is already done, so running either again is quick.
#   need_apt PKG...   install Debian packages that are missing (as root, or through sudo)
#   ensure_venv       .venv (or another DIR) with the package and its test extras installed
#   fetch_models      models and sample media, from ../shared when it is there, else by URL

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${EDGECAM_SHARED:-$REPO/../shared}"

need_apt() {
    if ! command -v dpkg-query >/dev/null; then
        echo "no dpkg here: install $* with your system's package manager" >&2
        return 1
    fi
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "needs ${missing[*]}: run as root or install sudo" >&2; return 1; }
        sudo="sudo"
    fi
    echo "installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    # ensure_venv [DIR [PIP_SPEC...]]: DIR (default .venv) with the package, its test
    # extras and any further specs (e.g. a pinned runtime) installed
    local venv="${1:-$REPO/.venv}"
    shift $(( $# > 0 ? 1 : 0 ))
    need_apt python3-venv
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    # pip skips what is installed already; the stamp skips pip when pyproject and the specs are unchanged
    local stamp="$venv/.edgecam-installed"
    if [ ! -f "$stamp" ] || [ "$REPO/pyproject.toml" -nt "$stamp" ] || [ "$(cat "$stamp")" != "$*" ]; then
        echo "installing edgecam and its dependencies into $venv${*:+ (with $*)}" >&2
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e "$REPO[test]" "$@"
        echo "$*" > "$stamp"
    fi
}

fetch_models() {
    local out
    if [ -d "$SHARED" ]; then
        # every file sha256-checked; only a failure is worth printing
        out="$("$REPO/.venv/bin/python" "$REPO/scripts/fetch_models.py" --mirror "$SHARED")" || {
            echo "$out" >&2
            return 1
        }
    else
        echo "no $SHARED: downloading what has a public URL; the YOLOv8n exports and the sample" \
             "clips come only from a copy of it (tests that need them skip, the demo cannot run)" >&2
        "$REPO/.venv/bin/python" "$REPO/scripts/fetch_models.py" | grep -v ': ok$' >&2 || true
    fi
}
