#!/usr/bin/env python3
"""Tessera vs. PyTorch DDP on Fashion-MNIST, on one machine, in one run.

Both systems train the same 784-256-128-10 MLP with Adam (lr 1e-3), batch
128 per worker, 2 workers, for the same number of epochs:

  * Tessera: `tessera local` with 2 parameter servers and 2 workers
    (synchronous), using examples/fashion_mnist_mlp.textproto.
  * PyTorch DDP: gloo backend, 2 processes with 1 thread each on 127.0.0.1;
    rank r trains on x[r::2] with a fresh permutation every epoch.

A third row measures how fast Tessera's workers would go with no exchange
at all: bench/compute_bench, their own work (batch gathering, forward and
backward on the CPU backend, rank 0's evaluation after each epoch) in 2
processes at once with no servers. Its samples/s over DDP's is the most
any exchange could give Tessera with this backend on this machine.

Each system runs --seeds times with different seeds (initial weights and
data order; Tessera 42, 43, ..., DDP 0, 1, ...), alternating, because one
run's test accuracy moves by a few tenths of a point with the seed alone.
Prints a table (median samples/s, mean and range of test accuracy,
Tessera/DDP throughput ratio, the compute-alone ratios) and writes the
figures, every run's, and a description of the machine as JSON.

Usage (from the repository root):
  python3 bench/fmnist_vs_ddp.py [--build_dir=build] [--epochs=3] [--seeds=5]
                                 [--out=bench/results/fmnist_vs_ddp.json]
"""

import argparse
import datetime
import gzip
import json
import os
import platform
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JOB = os.path.join(REPO_ROOT, "examples", "fashion_mnist_mlp.textproto")
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

WORKERS = 2
SERVERS = 2
BATCH_SIZE = 128  # per worker
LEARNING_RATE = 1e-3
LAYERS = (784, 256, 128, 10)
TESSERA_FIRST_SEED = 42  # examples/fashion_mnist_mlp.textproto's seed
DDP_FIRST_SEED = 0


# ---------------------------------------------------------------------------
# Fashion-MNIST
# ---------------------------------------------------------------------------


def read_idx(path):
    """Reads a (possibly gzipped) IDX file of unsigned bytes into an array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        if magic >> 8 != 0x08:  # 0x00 0x00 0x08 ndim: unsigned bytes
            raise ValueError(f"{path}: not an unsigned-byte IDX file "
                             f"(magic {magic:#010x})")
        ndim = magic & 0xFF
        shape = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    expected = int(np.prod(shape))
    if data.size != expected:
        raise ValueError(f"{path}: {data.size} bytes of data, expected {expected}")
    return data.reshape(shape)


def load_split(data_dir, prefix):
    """Returns (images as float32 [n, 784] scaled by 1/255, labels as int64)."""
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{prefix}: {images.shape[0]} images but "
                         f"{labels.shape[0]} labels")
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32))
    x.mul_(1.0 / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def torch_blas():
    """Which BLAS PyTorch multiplies with: its build setting and the library
    this process has mapped (Debian's torch uses the system libblas.so.3)."""
    match = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    libraries = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                name = os.path.basename(path)
                if path.startswith("/") and re.search(r"blas|mkl|blis", name):
                    libraries.add(os.path.realpath(path))
    except OSError:
        pass
    libraries = sorted(libraries)
    # Debian installs the netlib reference BLAS under .../blas/; optimised
    # implementations live under openblas-*/, blis-*/ or are MKL.
    reference = any("/blas/" in p and "openblas" not in p for p in libraries)
    return {
        "blas_info": match.group(1) if match else "unknown",
        "libraries": libraries,
        "reference_blas": reference,
    }


def machine_info():
    try:
        nproc = len(os.sched_getaffinity(0))  # what `nproc` reports
    except AttributeError:
        nproc = os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "nproc": nproc,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_blas": torch_blas(),
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------
# Tessera
# ---------------------------------------------------------------------------

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) - ([0-9.]+)s .* - ([0-9.]+) samples/s")


def run_tessera(build_dir, job_path, epochs, timeout_s, seed):
    binary = os.path.join(build_dir, "bin", "tessera")
    if not os.access(binary, os.X_OK):
        sys.exit(f"error: {binary} not found or not executable; build it first "
                 f"(ninja -C {build_dir})")
    with tempfile.TemporaryDirectory(prefix="fmnist_vs_ddp_") as tmp:
        summary_path = os.path.join(tmp, "summary.json")
        log_dir = os.path.join(tmp, "logs")
        os.makedirs(log_dir)
        cmd = [
            binary, "local",
            f"--job={job_path}",
            f"--servers={SERVERS}",
            f"--workers={WORKERS}",
            f"--epochs={epochs}",
            f"--batch_size={BATCH_SIZE}",
            f"--learning_rate={LEARNING_RATE}",
            f"--seed={seed}",
            f"--summary_json={summary_path}",
            f"--log_dir={log_dir}",
        ]
        print("tessera: " + " ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        # SIGTERM makes `tessera local` stop its servers and workers.
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            proc.terminate()

        watchdog = threading.Timer(timeout_s, stop)
        watchdog.start()
        output = []
        try:
            for line in proc.stdout:
                output.append(line)
                print("  | " + line.rstrip("\n"), flush=True)
            proc.wait()
        finally:
            watchdog.cancel()
        elapsed = time.perf_counter() - start
        if timed_out.is_set():
            sys.exit(f"error: tessera did not finish within {timeout_s:g} s")
        if proc.returncode != 0:
            for name in sorted(os.listdir(log_dir)):
                path = os.path.join(log_dir, name)
                if os.path.isfile(path):
                    with open(path, errors="replace") as f:
                        tail = f.readlines()[-20:]
                    print(f"--- {name} (last lines) ---\n" + "".join(tail),
                          file=sys.stderr)
            sys.exit(f"error: tessera exited with status {proc.returncode}")
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"error: cannot read tessera's summary {summary_path}: {e}")

    for key in ("samples_per_sec", "test_accuracy"):
        if key not in summary:
            sys.exit(f"error: tessera's summary has no '{key}': {summary}")
    epoch_lines = []
    for line in output:
        m = EPOCH_LINE.match(line.strip())
        if m:
            epoch_lines.append({"epoch": int(m.group(1)),
                                "seconds": float(m.group(3)),
                                "samples_per_sec": float(m.group(4))})
    return {
        "samples_per_sec": float(summary["samples_per_sec"]),
        "test_accuracy": float(summary["test_accuracy"]),
        "wall_seconds": summary.get("wall_seconds"),
        "process_seconds": elapsed,
        "epochs": summary.get("epochs"),
        "steps": summary.get("steps"),
        "servers": SERVERS,
        "workers": summary.get("workers", WORKERS),
        "batch_size_per_worker": summary.get("batch_size", BATCH_SIZE),
        "mode": summary.get("mode"),
        "seed": seed,
        # Per-epoch training throughput as worker 0 printed it (the run's
        # samples_per_sec also covers the test evaluation after each epoch).
        "per_epoch": epoch_lines,
        "command": cmd[:-2] + ["--summary_json=TMP", "--log_dir=TMP"],
        "summary": summary,
    }


def run_compute(build_dir, job_path, epochs, timeout_s):
    """The workers' own work alone: bench/compute_bench (the worker's batch
    gathering, forward and backward on the CPU backend, and rank 0's
    evaluation after each epoch) in WORKERS processes at once, with no
    servers. Samples/s counts every rank's batches over the slowest rank's
    time, as a synchronous job's steps wait for the slowest worker."""
    binary = os.path.join(build_dir, "bin", "compute_bench")
    if not os.access(binary, os.X_OK):
        sys.exit(f"error: {binary} not found or not executable; build it first "
                 f"(ninja -C {build_dir} compute_bench)")
    with tempfile.TemporaryDirectory(prefix="fmnist_compute_") as tmp:
        procs = []
        for rank in range(WORKERS):
            out = os.path.join(tmp, f"rank{rank}.json")
            cmd = [binary, f"--job={job_path}", f"--rank={rank}", f"--epochs={epochs}",
                   f"--out={out}"]
            procs.append((subprocess.Popen(cmd), out))
        print("compute: " + " ".join(cmd[:-1]) + " (one per rank)", flush=True)
        ranks = []
        for proc, out in procs:
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                for p, _ in procs:
                    p.kill()
                sys.exit(f"error: compute_bench did not finish within {timeout_s:g} s")
            if code != 0:
                sys.exit(f"error: compute_bench exited with status {code}")
            with open(out) as f:
                ranks.append(json.load(f))
    seconds = max(r["seconds"] for r in ranks)
    samples = sum(r["steps"] * r["batch_size"] for r in ranks)
    rate = samples / seconds
    print(f"  | compute alone: {rate:.0f} samples/s (slowest rank {seconds:.2f} s)", flush=True)
    return {"samples_per_sec": rate, "seconds": seconds, "ranks": ranks}


# ---------------------------------------------------------------------------
# PyTorch DDP
# ---------------------------------------------------------------------------


def make_mlp():
    layers = []
    for i in range(len(LAYERS) - 1):
        layers.append(torch.nn.Linear(LAYERS[i], LAYERS[i + 1]))
        if i + 2 < len(LAYERS):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank, world, port, epochs, data_dir, seed, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        x_train, y_train = load_split(data_dir, "train")
        x_test, y_test = load_split(data_dir, "t10k")
        xs = x_train[rank::world].contiguous()
        ys = y_train[rank::world].contiguous()

        torch.manual_seed(seed)  # DDP also broadcasts rank 0's weights
        model = torch.nn.parallel.DistributedDataParallel(make_mlp())
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        loss_fn = torch.nn.CrossEntropyLoss()
        shuffle = torch.Generator().manual_seed(seed * 1000 + rank + 1)

        epoch_seconds = []
        samples = 0
        loss_sum, loss_count = 0.0, 0
        model.train()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(epochs):
            epoch_start = time.perf_counter()
            perm = torch.randperm(xs.shape[0], generator=shuffle)
            for i in range(0, xs.shape[0], BATCH_SIZE):
                idx = perm[i:i + BATCH_SIZE]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(xs[idx]), ys[idx])
                loss.backward()
                optimizer.step()
                samples += idx.shape[0]
                loss_sum += loss.item()
                loss_count += 1
            epoch_seconds.append(time.perf_counter() - epoch_start)
        dist.barrier()
        train_seconds = time.perf_counter() - start

        total = torch.tensor([samples], dtype=torch.int64)
        dist.all_reduce(total)
        if rank == 0:
            model.eval()
            with torch.no_grad():
                correct = (model.module(x_test).argmax(1) == y_test).sum().item()
            results.put({
                "samples_per_sec": total.item() / train_seconds,
                "test_accuracy": correct / y_test.shape[0],
                "train_seconds": train_seconds,
                "epoch_seconds_rank0": epoch_seconds,
                "samples": int(total.item()),
                "mean_train_loss_rank0": loss_sum / max(1, loss_count),
            })
    finally:
        dist.destroy_process_group()


def run_ddp(epochs, data_dir, seed):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = free_port()
    print(f"ddp: gloo, {WORKERS} processes x 1 thread, 127.0.0.1:{port}, "
          f"{epochs} epoch(s), seed {seed}", flush=True)
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(ddp_worker, args=(WORKERS, port, epochs, data_dir, seed, results),
             nprocs=WORKERS, join=True)
    if results.empty():
        sys.exit("error: DDP run produced no result")
    r = results.get()
    r.update({
        "processes": WORKERS,
        "threads_per_process": 1,
        "backend": "gloo",
        "batch_size_per_worker": BATCH_SIZE,
        "epochs": epochs,
        "seed": seed,
    })
    return r


def combine(runs):
    """One system's runs: median samples/s, mean test accuracy, and every run."""
    accs = [r["test_accuracy"] for r in runs]
    out = dict(runs[len(runs) // 2])  # the other fields of one run, for reference
    out.update({
        "samples_per_sec": statistics.median(r["samples_per_sec"] for r in runs),
        "test_accuracy": statistics.fmean(accs),
        "test_accuracy_min": min(accs),
        "test_accuracy_max": max(accs),
        "test_accuracy_runs": accs,
        "samples_per_sec_runs": [r["samples_per_sec"] for r in runs],
        "seeds": [r["seed"] for r in runs],
    })
    out.pop("seed", None)
    return out


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build_dir", default=os.path.join(REPO_ROOT, "build"),
                        help="CMake build folder holding bin/tessera")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(
        REPO_ROOT, "bench", "results", "fmnist_vs_ddp.json"))
    parser.add_argument("--job", default=DEFAULT_JOB,
                        help="Tessera job file (Fashion-MNIST MLP)")
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR,
                        help="folder with the gzipped Fashion-MNIST IDX files")
    parser.add_argument("--timeout_s", type=float, default=3600,
                        help="limit for each Tessera run")
    parser.add_argument("--seeds", type=int, default=5,
                        help="runs per system, each with its own seed")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    build_dir = os.path.abspath(args.build_dir)
    job_path = os.path.abspath(args.job)
    out_path = os.path.abspath(args.out)
    machine = machine_info()

    tessera_runs, ddp_runs, compute_runs = [], [], []
    for i in range(args.seeds):  # alternating, so slow spells hit all three
        tessera_runs.append(run_tessera(build_dir, job_path, args.epochs, args.timeout_s,
                                        TESSERA_FIRST_SEED + i))
        ddp_runs.append(run_ddp(args.epochs, args.data_dir, DDP_FIRST_SEED + i))
        compute_runs.append(run_compute(build_dir, job_path, args.epochs, args.timeout_s))
    tessera, ddp = combine(tessera_runs), combine(ddp_runs)
    ratio = tessera["samples_per_sec"] / ddp["samples_per_sec"]
    compute = {
        "samples_per_sec": statistics.median(r["samples_per_sec"] for r in compute_runs),
        "samples_per_sec_runs": [r["samples_per_sec"] for r in compute_runs],
        "runs": compute_runs,
    }
    compute_over_ddp = compute["samples_per_sec"] / ddp["samples_per_sec"]
    tessera_over_compute = tessera["samples_per_sec"] / compute["samples_per_sec"]

    def acc(r):
        if len(r["test_accuracy_runs"]) == 1:
            return f"{r['test_accuracy']:.4f}"
        return (f"{r['test_accuracy']:.4f} ({r['test_accuracy_min']:.4f}-"
                f"{r['test_accuracy_max']:.4f})")

    rows = [
        ("system", "samples/s (median)", f"test accuracy, mean (range) of {args.seeds}"),
        (f"Tessera ({SERVERS} servers, {WORKERS} workers, sync)",
         f"{tessera['samples_per_sec']:.0f}", acc(tessera)),
        (f"PyTorch DDP (gloo, {WORKERS} x 1 thread)",
         f"{ddp['samples_per_sec']:.0f}", acc(ddp)),
        (f"compute alone ({WORKERS} processes, no servers)",
         f"{compute['samples_per_sec']:.0f}", "-"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    print(f"Fashion-MNIST MLP {'-'.join(map(str, LAYERS))}, Adam lr "
          f"{LEARNING_RATE:g}, batch {BATCH_SIZE}/worker, {args.epochs} epoch(s); "
          f"{machine['cpu_model']}, nproc {machine['nproc']}")
    for i, r in enumerate(rows):
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}")
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"Tessera/DDP samples/s: {ratio:.2f}")
    print(f"compute alone/DDP samples/s: {compute_over_ddp:.2f} (what the workers' own work "
          "allows here with no exchange at all)")
    print(f"Tessera/compute alone: {tessera_over_compute:.2f}")
    if machine["torch_blas"]["reference_blas"]:
        print("note: PyTorch multiplies with the reference (netlib) BLAS "
              f"({', '.join(machine['torch_blas']['libraries'])}), "
              "which makes its matrix products slow; DDP's samples/s reflect that.")

    report = {
        "benchmark": "fmnist_vs_ddp",
        "model": "mlp:" + "-".join(map(str, LAYERS)),
        "optimizer": {"type": "adam", "learning_rate": LEARNING_RATE},
        "batch_size_per_worker": BATCH_SIZE,
        "workers": WORKERS,
        "epochs": args.epochs,
        "seeds_per_system": args.seeds,
        "tessera": tessera,
        "ddp": ddp,
        "ratio_tessera_over_ddp_samples_per_sec": ratio,
        "compute_alone": compute,
        "ratio_compute_alone_over_ddp": compute_over_ddp,
        "ratio_tessera_over_compute_alone": tessera_over_compute,
        "machine": machine,
    }
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
