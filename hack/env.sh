# Source this file: it puts a Python environment with everything the tests and
# benchmarks need on PATH, building it once per version of pyproject.toml.
# The environment lives outside the checkout (CI clones afresh), keyed by the
# hash of pyproject.toml, so a warm machine reuses it.
_kt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_kt_cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
_kt_key="$(sha256sum "$_kt_root/pyproject.toml" | cut -c1-12)"
_kt_venv="$_kt_cache/venv-$_kt_key"
# KUBETUNE_EXTRAS=test,bench adds the peers (Optuna, Ray Tune) for bench/.
_kt_extras="${KUBETUNE_EXTRAS:-test}"
if [ ! -x "$_kt_venv/bin/python" ] || [ ! -f "$_kt_venv/.ready-$_kt_extras" ]; then
    echo "hack/env.sh: building Python environment $_kt_venv [$_kt_extras]" >&2
    mkdir -p "$_kt_cache"
    python3 -m venv "$_kt_venv"
    "$_kt_venv/bin/python" -m pip install -q --upgrade pip "setuptools>=77" wheel
    "$_kt_venv/bin/python" -m pip install -q -e "$_kt_root[$_kt_extras]"
    touch "$_kt_venv/.ready-$_kt_extras"
fi
# Several checkouts (CI's fresh clone, worktrees) share one environment: the
# checkout that sourced this file comes first on the import path, here and in
# every process it starts.
export PYTHONPATH="$_kt_root${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$_kt_venv/bin:$PATH"
export VIRTUAL_ENV="$_kt_venv"
unset _kt_root _kt_cache _kt_key _kt_venv _kt_extras
