#!/usr/bin/env bash
# The wheels the GPU machine's image lacks (pydantic and its parts, zstandard) or has at another
# version than byteify pins (transformers 5.17 there, 5.24.0 here: BLT's code differs; peft, typer),
# downloaded for that machine (CPython 3.12, manylinux x86_64) into the git-ignored .whl/ folder,
# so that the device tool's `run` can carry them (carry: [".whl"]) and install them with pip
# --no-index.  torch is never downloaded: the image's CUDA build is used.  Versions come from
# pyproject.toml (pins), pydantic's own pin of pydantic-core, and the .venv's versions of
# pydantic's small dependencies.  Prints each wheel's size, the total with the working tree (it must
# stay under the tool's 64 MiB), and the exact run invocation.
#
#   bash scripts/gpu_wheels.sh            # needs pip and access to the package index
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
"$PY" -m pip --version >/dev/null 2>&1 || { echo "gpu_wheels: $PY has no pip (set PYTHON=...)" >&2; exit 2; }

pin() {  # the == pin of a dependency in pyproject.toml
    sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -1
}
venv_version() {  # the version installed in the project's venv (the tested one), else empty
    "$PY" - "$1" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import version
print(version(sys.argv[1]))
PY
}

TRANSFORMERS=$(pin transformers); PEFT=$(pin peft); PYDANTIC=$(pin pydantic); TYPER=$(pin typer)
ZSTD=$(pin zstandard)
for v in TRANSFORMERS PEFT PYDANTIC TYPER ZSTD; do
    [ -n "${!v}" ] || { echo "gpu_wheels: no pin for ${v,,} in pyproject.toml" >&2; exit 2; }
done

# ignored by git, so the wheels travel only when a run names .whl in carry
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/.whl/' >> .git/info/exclude
fi
rm -rf .whl && mkdir .whl

download() {
    local log
    log=$(mktemp)
    if ! "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -q -d .whl "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2 || true
        rm -f "$log"
        echo "gpu_wheels: pip download failed for: $*" >&2
        exit 1
    fi
    rm -f "$log"
}

echo "== downloading into .whl/ (cp312, manylinux x86_64)"
download "transformers==$TRANSFORMERS" "peft==$PEFT" "pydantic==$PYDANTIC" "typer==$TYPER" "zstandard==$ZSTD"
CORE=$(unzip -p .whl/pydantic-"$PYDANTIC"-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([^ ;]*\).*/\1/p')
[ -n "$CORE" ] || { echo "gpu_wheels: pydantic $PYDANTIC's METADATA names no pydantic-core pin" >&2; exit 1; }
extra=("pydantic-core==$CORE")
for name in annotated-types typing-inspection typing-extensions; do
    v=$(venv_version "$name")
    extra+=("$name${v:+==$v}")
done
download "${extra[@]}"

# one version of each package (two would stop the install on the device)
dups=$(ls .whl | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dups" ] || { echo "gpu_wheels: more than one wheel of: $dups" >&2; exit 1; }

echo
printf '%10s  %s\n' "bytes" "wheel"
for f in .whl/*.whl; do printf '%10d  %s\n' "$(stat -c %s "$f")" "$(basename "$f")"; done
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((whl + tree))
printf '%10d  total of the wheels (%.1f MiB)\n' "$whl" "$(echo "$whl / 1048576" | bc -l)"
printf '%10d  working tree that travels (tracked + untracked-not-ignored files)\n' "$tree"
printf '%10d  together (%.1f MiB of the 64 MiB a run may carry)\n' "$total" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "gpu_wheels: over 60 MiB: the device tool would refuse the working tree" >&2
    exit 1
fi

echo
echo "== the device tool's run (one call; the check itself takes at most ~7.5 minutes):"
"$PY" "$ROOT/scripts/gpu_check.py" --print-run
