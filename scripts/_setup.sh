# Sourced by scripts/run, scripts/test and scripts/bench: installs what dcmfs
# needs on a Debian machine (apt packages when missing, a virtual environment
# in .venv with the package), then exports what the tools need.
set -euo pipefail
DCMFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$DCMFS_ROOT"

_sudo() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

_missing=()
command -v fusermount3 >/dev/null 2>&1 || _missing+=(fuse3)
ldconfig -p 2>/dev/null | grep -q 'libfuse3\.so' || _missing+=(libfuse3-3)
for tool in ${DCMFS_TOOLS:-}; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || _missing+=("${tool#*:}")
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || _missing+=(python3-venv)
if [ "${#_missing[@]}" -gt 0 ]; then
    echo "dcmfs setup: installing ${_missing[*]} with apt-get" >&2
    _sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    _sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${_missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
_extras="${DCMFS_EXTRAS:-}"
_stamp=".venv/.dcmfs-installed${_extras:+-$_extras}"
_want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_want" ]; then
    echo "dcmfs setup: installing the package into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -e ".${_extras:+[$_extras]}"
    echo "$_want" > "$_stamp"
fi
export PATH="$DCMFS_ROOT/.venv/bin:$PATH"
