#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py lists its steps): the one command to run on the GPU machine.
#   make gpu-wheels                       # first, here: the wheels and tokenizer that machine lacks, into .whl/
#   bash bench/gpu_check.sh               # there, with .whl/ copied along: install them, then every step
#   bash bench/gpu_check.sh --rehearsal   # anywhere: every step at tiny size on CPU, nothing installed
# Figures, logs and this script's whole output (gpu_check.log) go to $OUT when it is set, else to
# artifacts/gpu_check. PYTHON picks the interpreter (default python3: on the GPU machine, the one with torch).
# Other arguments go to bench/gpu_check.py (--help lists them).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-artifacts/gpu_check}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
{
    if [[ " $* " != *" --rehearsal "* ]]; then
        if ! compgen -G ".whl/*.whl" >/dev/null; then
            echo "error: no wheels in .whl/: run make gpu-wheels on a machine with network first, and copy .whl/ here."
            exit 2
        fi
        # The carried wheels go first on the path, before the versions the machine has installed.
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 2
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    "$python" bench/gpu_check.py --out "$out" --python "$python" "$@"
} 2>&1 | tee "$out/gpu_check.log"
