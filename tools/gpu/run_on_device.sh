#!/bin/bash
# Prepares gpu-bundle/ (ignored by git) for one run on a GPU machine that
# checks the CUDA backend end to end. Nothing is built over there.
#
# 1. Here (builds what is missing, then bundles):
#      tools/gpu/run_on_device.sh [BUILD_DIR]
#    BUILD_DIR defaults to build-cuda; it is configured with
#    -DTESSERA_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 if it does not exist.
# 2. On the GPU machine, with gpu-bundle/ copied there (it needs nothing
#    else but the NVIDIA driver, /usr/local/cuda's libraries and, for the
#    comparison, python3 with PyTorch):
#      OUT=/some/folder bash gpu-bundle/run.sh
#    (the steps below are capped at 540 s together; give it 570).
#
# gpu-bundle/run.sh runs, writing a log per step into $OUT:
#   nvidia-smi -L
#   cuda_backend_test (the `gpu`-labelled tests; JUnit XML too)
#   gpu_step_bench and bench/torch_gpu_step.py, then their ratios
#   tessera local --workers=2 --device=cuda on Fashion-MNIST for 3 epochs
#   (the example job with its data paths pointed into gpu-bundle/data)
# and exits non-zero if any step failed.
#
# Environment: FMNIST_DIR (default /usr/share/datasets/fashion-mnist),
# BUNDLE_TOOL, a script that copies binaries with the shared libraries they
# need into a folder (default ../shared/tools/bundle-for-device.sh).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build-cuda}
bundle=$root/gpu-bundle
data_dir=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
bundle_tool=${BUNDLE_TOOL:-$root/../shared/tools/bundle-for-device.sh}

die() { echo "run_on_device.sh: $*" >&2; exit 1; }
[ -x "$bundle_tool" ] || die "bundle tool not found at $bundle_tool (set BUNDLE_TOOL)"
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
         t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
  [ -f "$data_dir/$f" ] || die "missing $data_dir/$f (install dataset-fashion-mnist or set FMNIST_DIR)"
done

# The bundle runs on another machine: x86-64-v3, not this CPU's level (auto).
if [ ! -f "$build/build.ninja" ] && [ ! -f "$build/Makefile" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DTESSERA_WITH_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DTESSERA_MARCH=x86-64-v3
fi
cmake --build "$build" --target tessera tessera-server tessera-worker \
  cuda_backend_test gpu_step_bench ||
  die "build failed (is $build configured with -DTESSERA_WITH_CUDA=ON?)"

rm -rf "$bundle"
"$bundle_tool" "$bundle" \
  "$build/bin/tessera" "$build/bin/tessera-server" "$build/bin/tessera-worker" \
  "$build/bin/gpu_step_bench" "$build/tests/cuda_backend_test" >/dev/null
strip --strip-unneeded "$bundle/tessera" "$bundle/tessera-server" \
  "$bundle/tessera-worker" "$bundle/gpu_step_bench" "$bundle/cuda_backend_test"
mkdir -p "$bundle/data"
cp "$data_dir"/*.gz "$bundle/data/"
cp "$root/bench/torch_gpu_step.py" "$root/examples/fashion_mnist_mlp.textproto" \
  "$bundle/"

cat >"$bundle/run.sh" <<'RUN'
#!/bin/bash
# Runs on the GPU machine: bash gpu-bundle/run.sh (written by
# tools/gpu/run_on_device.sh). Logs and results go to $OUT.
set -uo pipefail
B=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$B/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
failed=()

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, logs to
# $OUT/NAME.log, shows the log's tail.
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"

step cuda_backend_test 120 "$B/cuda_backend_test" \
  --gtest_output="xml:$OUT/cuda_backend_test.xml"
step gpu_step_bench 120 "$B/gpu_step_bench" 200
step torch_gpu_step 120 python3 "$B/torch_gpu_step.py" --runs 200

echo "=== ratios (tessera ComputeGradients time / PyTorch time; < 1 is faster)"
python3 - "$OUT/gpu_step_bench.log" "$OUT/torch_gpu_step.log" <<'PY' | tee "$OUT/ratios.txt"
import sys
ms = {}
for path in sys.argv[1:]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        f = line.split()
        if len(f) == 6 and f[0] == "RESULT":
            ms[(f[1], f[2], f[3], f[4])] = float(f[5])
for (variant, model, batch, precision), t in sorted(ms.items()):
    if variant != "tessera":
        continue
    parts = [f"{model} batch {batch} {precision}: tessera {t:.3f} ms"]
    for other in ("torch-graph-host", "torch-graph", "torch-eager"):
        o = ms.get((other, model, batch, precision))
        if o:
            parts.append(f"{other} {o:.3f} ms (x{t / o:.2f})")
    print(", ".join(parts))
PY

sed "s#/usr/share/datasets/fashion-mnist#$B/data#" \
  "$B/fashion_mnist_mlp.textproto" >"$OUT/fmnist_cuda.textproto"
mkdir -p "$OUT/local-logs"
step tessera_local 180 "$B/tessera" local --job="$OUT/fmnist_cuda.textproto" \
  --servers=2 --workers=2 --device=cuda --epochs=3 \
  --log_dir="$OUT/local-logs" --summary_json="$OUT/local-summary.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
RUN
chmod +x "$bundle/run.sh"
du -sh "$bundle"
size_kb=$(du -sk "$bundle" | cut -f1)
[ "$size_kb" -lt $((64 * 1024)) ] || die "bundle is ${size_kb} KiB, over 64 MiB (keep it small enough to copy to the GPU machine in one go)"
echo "ready: gpu-bundle/ ($(du -sh "$bundle" | cut -f1)); on the GPU machine run 'bash gpu-bundle/run.sh'"
