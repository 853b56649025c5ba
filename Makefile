# Tessera: a parameter-server training service.
#   make demo   set up, build and train Fashion-MNIST on a local cluster
#   make test   set up, build and run the tests
# Everything builds into build/; binaries land in build/bin/.

BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
CTEST_FLAGS ?=
FUZZ_SECONDS ?= 60

DEB_PACKAGES := build-essential cmake ninja-build pkg-config \
	libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler \
	libeigen3-dev libabsl-dev libgtest-dev libgmock-dev zlib1g-dev prometheus-cpp-dev libcpp-httplib-dev prometheus \
	dataset-fashion-mnist python3 python3-numpy python3-protobuf iproute2 iptables docker-compose

.PHONY: all deps build test validate-deploy demo seed bench clean asan tsan fuzz thread-safety

all: build

# Installs the Debian packages that are missing (needs root or sudo).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "All Debian packages present."; fi

$(BUILD_DIR)/build.ninja:
	cmake -S . -B $(BUILD_DIR) -G Ninja $(CMAKE_FLAGS)

build: deps $(BUILD_DIR)/build.ninja
	cmake --build $(BUILD_DIR) -j $(JOBS)

# GPU tests are labelled `gpu` and excluded where no GPU is visible. The
# npm packages (Mermaid's parser for diagram_test) are installed first
# where node and npm exist.
test: build
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
	  npm ci --no-audit --no-fund --loglevel=error; fi
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  label_args=""; else label_args="-LE gpu"; fi; \
	cd $(BUILD_DIR) && ctest --output-on-failure $$label_args $(CTEST_FLAGS)
	$(MAKE) --no-print-directory validate-deploy

# Offline checks of deploy/ (Compose, Kustomize, schemas, Dockerfile lint,
# flags). Needs node and kubectl, which Debian does not package; without
# them the checks are reported as skipped, never as passed.
validate-deploy: build
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && \
	    command -v kubectl >/dev/null 2>&1; then \
	  npm ci --no-audit --no-fund --loglevel=error && bash deploy/validate.sh $(BUILD_DIR)/bin; \
	else echo "deploy validation SKIPPED: node, npm and kubectl are needed"; fi

demo: build
	$(BUILD_DIR)/bin/tessera local --job=examples/fashion_mnist_mlp.textproto \
	  --servers=2 --workers=2 --summary_json=$(BUILD_DIR)/demo-summary.json

seed: build
	$(BUILD_DIR)/bin/tessera local --job=examples/seed_regression.textproto --servers=2 --workers=2

# Benchmarks beside the baselines measured in the same run (iperf3, memcpy,
# PyTorch DDP): transport, apply, end-to-end and scaling. Writes
# bench/results/ (report.md, results.json, PNG plots) and prints a summary.
# BENCH_FLAGS="--profile" adds a perf profile; "--quick" is a smoke test.
BENCH_PACKAGES := iperf3 gnuplot-nox libopenblas0-pthread python3-torch
BENCH_FLAGS ?=
bench: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	/usr/bin/python3 bench/run_all.py --build_dir=$(BUILD_DIR) $(BENCH_FLAGS)

# Sanitizer builds, each in its own folder (build-asan, build-tsan,
# build-fuzz), run by tools/sanitize/run.sh, which holds the sanitizer
# options and prints every report any process wrote:
#   asan  ASan + UBSan, ctest -LE gpu; fails on any report
#   tsan  TSan with tools/sanitize/tsan.supp (halt_on_error=1), ctest -LE gpu,
#         including a planted race TSan must still catch (tsan_canary_test)
#   fuzz  libFuzzer (clang-14): every target in fuzz/ for FUZZ_SECONDS each;
#         fails on any crash, and prints executions and crashes per target
asan: deps
	JOBS=$(JOBS) CTEST_FLAGS="$(CTEST_FLAGS)" bash tools/sanitize/run.sh asan

tsan: deps
	JOBS=$(JOBS) CTEST_FLAGS="$(CTEST_FLAGS)" bash tools/sanitize/run.sh tsan

fuzz: deps
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="clang-14 libclang-rt-14-dev"
	JOBS=$(JOBS) FUZZ_SECONDS=$(FUZZ_SECONDS) bash tools/sanitize/run.sh fuzz

# The locking annotations (ABSL_GUARDED_BY...) and must-use results checked
# by clang at compile time, in build-tsa/; any violation fails the build. CI
# runs it.
thread-safety: deps
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="clang-14"
	JOBS=$(JOBS) bash tools/sanitize/run.sh thread-safety

clean:
	rm -rf $(BUILD_DIR)

# Fault scenarios of tests/chaos/ (RELIABILITY.md figures: partition,
# random loss, bandwidth cap, exact-sum oracle, server freeze, async worker
# kill and restart, SIGTERM under load; and a CPU-starved straggler with and
# without a backup worker), one after another, each in
# its own network namespaces and bounded in time; prints every scenario's
# PASS/FAIL lines and a summary. Needs root. CHAOS_SCENARIOS picks a subset.
CHAOS_SCENARIOS ?= quick_partition partition loss bandwidth exact_sum freeze \
	async_worker_restart sigterm_under_load straggler
.PHONY: chaos
chaos: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="iproute2 iptables python3-grpcio"
	bash tests/chaos/run_all.sh $(BUILD_DIR)/bin $(CHAOS_SCENARIOS)
