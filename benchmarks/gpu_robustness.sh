#!/usr/bin/env bash
# Issue 19's box-128 robustness rows on a lent GPU (the device tool's H200), in one command of at most ~540 s:
#
#   bash benchmarks/gpu_robustness.sh          # on the device, with .whl carried (run from the repository root)
#
# 1. installs the wheels in .whl/ (ASPIRE 0.14.3 and what it imports that the device lacks; mrcfile, starfile)
#    into $SITE (/tmp/site) and puts the checkout and $SITE on PYTHONPATH (jaxcryo is not pip-installed there);
# 2. prints the GPU (nvidia-smi -L) and JAX's devices;
# 3. makes the ASPIRE set: box 128 at 1.5 Å/px (box 64's 192 Å extent), 10,000 particles, SNR 0.1 in ASPIRE's
#    definition, seed 0, AsymmetricVolume, with $ASPIRE_PY as ASPIRE's Python (the device's python3 itself);
# 4. runs benchmarks/robustness.py on it: known, local, global, then abinitio, under --deadline (commands stopped
#    at the deadline, later tasks skipped; the JSON is written after each row);
# 5. keeps 5 files in $OUT: log.txt, res/robustness.json, res/robustness.png, set.json, task_logs.txt.
#
# Environment: PY (jaxcryo's Python, default python3), ASPIRE_PY (default $PY), OUT (default
# bench_out/gpu_robustness), WORK (default /tmp/work), SITE (default /tmp/site), WHEELS (default .whl; empty:
# install nothing), BUDGET (seconds for the whole script, default 540), BOX, PX, N, SNR, SEED (another set than
# the box-128 one), TASKS, REFINE_ARGS, TASK_TIMEOUT (seconds
# for each task; default none: local, then global, then abinitio each get what is left).
# GPU_ROBUSTNESS_QUICK=1: a CPU dry run of the same flow (box 32 at 6 Å/px, 500 particles, local only, 2 refine
# iterations).
set -uo pipefail
START=$(date +%s)
PY=${PY:-python3}
ASPIRE_PY=${ASPIRE_PY:-$PY}
OUT=${OUT:-$PWD/bench_out/gpu_robustness}
WORK=${WORK:-/tmp/work}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS-.whl}
BUDGET=${BUDGET:-540}
if [ "${GPU_ROBUSTNESS_QUICK:-0}" = 1 ]; then
    BOX=32 PX=6.0 N=500 TASKS=${TASKS:-local} REFINE_ARGS=${REFINE_ARGS:---iterations 2 --batch-size 100}
    # XLA:CPU of jaxlib 0.11.2 on a 2-core machine deadlocked in refine's two concurrent half-map estimates
    # (an FFT waiting for the intra-op thread pool that both executions hold); one thread per op avoids it
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_multi_thread_eigen=false"
else
    BOX=${BOX:-128} PX=${PX:-1.5} N=${N:-10000} TASKS=${TASKS:-local global abinitio} REFINE_ARGS=${REFINE_ARGS:-}
fi
SNR=${SNR:-0.1} SEED=${SEED:-0}
mkdir -p "$OUT/res" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# Each jaxcryo command is its own process, and the harness computes FSCs with JAX too: memory on demand, so
# that the harness's process does not hold 75% of the GPU while a command runs.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

elapsed() { echo $(( $(date +%s) - START )); }
step() {  # step NAME COMMAND...: run, print its rc and seconds
    local name=$1 t0 rc
    shift
    t0=$(date +%s%N)
    echo "=== [$(elapsed) s] $name"
    "$@"
    rc=$?
    echo "=== [$(elapsed) s] $name: rc=$rc, $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    return $rc
}

install() {
    if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl || return
        export PYTHONPATH=$PWD:$SITE
    else
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
}
devices() {
    nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
    "$PY" -c "import jax, jaxcryo, sys; print('jax', jax.__version__, jax.default_backend(), jax.devices()); \
print('jaxcryo', jaxcryo.__file__, '| jax_finufft imported:', 'jax_finufft' in sys.modules)"
    "$ASPIRE_PY" -c "import aspire, sys; print('aspire', aspire.__version__, 'python', sys.version.split()[0])"
    "$PY" -c "import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in ('numpy', 'scipy', \
'pandas', 'starfile', 'mrcfile', 'equinox', 'optax', 'jaxtyping', 'matplotlib')))"
}
make_set() {  # the set alone, timed on its own; robustness.py then finds it (same key, same --work)
    "$PY" - "$WORK" "$ASPIRE_PY" "$BOX" "$PX" "$N" "$SNR" "$SEED" $(( BUDGET - $(elapsed) - 60 )) <<'EOF'
import json, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import robustness
work, py, box, px, n, snr, seed, left = sys.argv[1:]
key = {"generator": "aspire", "volume": "asym", "box": int(box), "pixel_size": float(px), "particles": int(n),
       "snr": float(snr), "seed": int(seed)}
s = robustness.make_set(key, Path(work), py, 1.5, time.monotonic() + float(left))
print(json.dumps({k: s.get(k) for k in ("dir", "pixel_size", "snr_aspire_measured", "snr_jaxcryo_measured",
                                       "make_seconds", "seconds")}))
EOF
}
robust() {
    local left=$(( BUDGET - $(elapsed) - 25 ))  # 25 s for the plot, the copies and the wheel-less exit
    echo "robustness.py deadline: $left s"
    # shellcheck disable=SC2086  # TASKS is a list
    timeout --kill-after=10 $(( left + 45 )) "$PY" benchmarks/robustness.py --generators aspire --volumes asym \
        --box "$BOX" --pixel-size "$PX" --particles "$N" --snr "$SNR" --seeds "$SEED" --tasks $TASKS --no-relion \
        --aspire-python "$ASPIRE_PY" --refine-args="$REFINE_ARGS" --deadline "$left" \
        ${TASK_TIMEOUT:+--task-timeout "$TASK_TIMEOUT"} --out "$OUT/res" --work "$WORK"
}
collect() {  # set.json and the tails of the commands' logs; no maps
    local d
    d=$(ls -d "$WORK"/aspire_asym_b${BOX}_n${N}_snr*_s${SEED}* 2>/dev/null | head -1)
    [ -n "$d" ] || return 1
    cp "$d/set.json" "$OUT/set.json" 2>/dev/null
    for f in "$d"/*.log; do
        [ -f "$f" ] && { echo "===== $f"; tail -n 60 "$f"; }
    done > "$OUT/task_logs.txt"
    ls -la "$d" "$OUT" "$OUT/res"
}

step install install || exit 1
step devices devices
step make_set make_set || { collect; exit 1; }
step robustness robust
step collect collect
echo "total $(elapsed) s"
sleep 1  # let tee write the last lines into $OUT/log.txt
