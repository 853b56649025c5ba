#!/usr/bin/env python3
"""Tessera's benchmarks in one command, with the baselines measured in the same run.

Stages, run one after another (never two at once):

  iperf3     one TCP stream on 127.0.0.1 (iperf3 -t 5 -P 1 -C cubic, the algorithm
             Tessera's loopback connections use), before and after
             the transport stage; the higher figure is the reference
  transport  build/bin/transport_bench: push and pull through a real
             tessera-server at 1, 16 and 64 MiB (1 server, 1 worker stream),
             beside a no-op gRPC server, memcpy and protobuf's CPU costs
  transport_unix  the same loops over a Unix-domain socket (same-host
             processes could use one), beside the TCP figures
  transport_shm   the same loops with payloads through the same-host
             shared-memory region (what workers on the servers' host use)
  apply      build/bin/apply_bench: Optimizer::Apply over 64 MiB beside memcpy
  e2e        bench/fmnist_vs_ddp.py: Fashion-MNIST, Tessera (2 servers,
             2 workers, sync) vs PyTorch DDP (gloo, 2 x 1 thread), 3 epochs
  scaling    `tessera local`, Fashion-MNIST sync, 2 servers, 1/2/4 workers
  scaling_caps  bench/scaling_netns.sh (root): the same with every worker in
             its own network namespace behind a tbf bandwidth cap
  profile    (only with --profile) perf record of the 64 MiB push and pull
             loops, to see where the time goes

Writes bench/results/report.md, bench/results/results.json, the stages' own
JSON files and PNG plots (gnuplot), and prints the summary table.

Each stage records how busy the machine was with other work while it ran
(CPU time from /proc/stat minus this run's own), since on a small shared
machine that is the main source of noise.

Usage (from the repository root, with Debian's python3, which has torch):
  /usr/bin/python3 bench/run_all.py [--build_dir=build] [--only=transport,apply]
                                    [--quick] [--profile]
"""

import argparse
import datetime
import fcntl
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
FMNIST_JOB = os.path.join(REPO_ROOT, "examples", "fashion_mnist_mlp.textproto")
STAGES = ("iperf3", "transport", "transport_unix", "transport_shm", "apply", "e2e", "scaling", "scaling_caps",
          "profile")
SIZES_MIB = (1, 16, 64)

# Figures measured by others on a 2-core machine like this one (127.0.0.1,
# 1 server / 1 worker); they are not re-measured here.
ANCHORS = {
    "pslite_push_gbps": {1: 4.13, 16: 4.09, 64: 1.86},
    "pslite_pull_gbps": {1: 3.60, 16: 3.13, 64: 1.67},
    "iperf3_gbps": 4.55,
    "memcpy_64mib_gbps": 17.0,
    "pytorch_ddp_samples_per_sec": 9060,
}
# Acceptance criteria of the fast-path work.
ACCEPT_PSLITE_RATIO = 1.0
ACCEPT_IPERF_RATIO = 0.85
ACCEPT_ADAM_MEMCPY_RATIO = 0.70


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Machine description and noise
# ---------------------------------------------------------------------------


def read_first(path, default=""):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def cpu_model():
    for line in read_first("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def command_output(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def debian_blas():
    """The libblas.so.3 alternative Debian resolves to (OpenBLAS or netlib)."""
    out = command_output(["update-alternatives", "--query", "libblas.so.3-x86_64-linux-gnu"])
    m = re.search(r"^Value:\s*(\S+)", out, re.M)
    return m.group(1) if m else "unknown"


def torch_info():
    """PyTorch's version and the BLAS library it loads, in a child process
    (so that importing torch does not weigh on this one)."""
    code = (
        "import json, os, re, torch\n"
        "libs = set()\n"
        "for line in open('/proc/self/maps'):\n"
        "    p = line.split()[-1]\n"
        "    if p.startswith('/') and re.search(r'blas|mkl|blis', os.path.basename(p)):\n"
        "        libs.add(os.path.realpath(p))\n"
        "m = re.search(r'BLAS_INFO=([^,\\s]+)', torch.__config__.show())\n"
        "print(json.dumps({'torch': torch.__version__, 'blas_info': m.group(1) if m else 'unknown',"
        " 'blas_libraries': sorted(libs), 'threads': torch.get_num_threads()}))\n")
    out = command_output(["/usr/bin/python3", "-c", code])
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"torch": "unavailable"}


def build_march(build_dir):
    """The -march the build folder compiled with (CMake's TESSERA_MARCH resolved)."""
    for line in read_first(os.path.join(build_dir, "CMakeCache.txt")).splitlines():
        if line.startswith("TESSERA_MARCH_RESOLVED:"):
            return line.split("=", 1)[1] or "compiler default"
    return "unknown"


def machine_info(build_dir):
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    mem_kb = 0
    for line in read_first("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu_model": cpu_model(),
        "nproc": nproc,
        "memory_gib": round(mem_kb / 2**20, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        # TCP figures depend on it (on loopback BBR's pacing costs speed).
        "tcp_congestion_control": read_first("/proc/sys/net/ipv4/tcp_congestion_control",
                                             "unknown").strip(),
        "debian_version": read_first("/etc/debian_version", "unknown"),
        "debian_libblas": debian_blas(),
        "torch": torch_info(),
        "compiler": command_output(["c++", "--version"]).splitlines()[0:1],
        "build_march": build_march(build_dir),
        "iperf3": (command_output(["iperf3", "--version"]).splitlines() or ["missing"])[0],
        "gnuplot": (command_output(["gnuplot", "--version"]).splitlines() or ["missing"])[0],
        "load_average_at_start": list(os.getloadavg()),
        "source": source_state(),
    }


def source_state():
    """The commit measured and the files that differ from it (others may be
    editing the tree while benchmarks run)."""
    def git(*a):
        return command_output(["git", "-C", REPO_ROOT] + list(a)).strip()
    return {
        "commit": git("rev-parse", "HEAD"),
        "modified_files": git("status", "--porcelain", "--untracked-files=no").splitlines(),
    }


def cpu_ticks():
    """(busy, steal) jiffies over all CPUs from /proc/stat."""
    fields = [int(x) for x in read_first("/proc/stat").splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def children_cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime + own.ru_utime + own.ru_stime


def top_processes(n=5):
    """The busiest processes right now (not this run's), from ps."""
    out = command_output(["ps", "-eo", "pid,ppid,pcpu,comm", "--sort=-pcpu", "--no-headers"])
    mine = {os.getpid()}
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 4:
            continue
        pid, ppid, pcpu, comm = int(parts[0]), int(parts[1]), float(parts[2]), parts[3]
        if pid in mine or ppid in mine or comm == "ps":
            continue
        if pcpu >= 1.0:
            rows.append(f"{comm} {pcpu:.0f}%")
        if len(rows) >= n:
            break
    return rows


def wait_for_quiet(max_wait_s, busy_limit, quiet_seconds=5):
    """Waits (up to max_wait_s) until other work has used less than
    busy_limit cores for quiet_seconds in a row, sampled every second.
    Returns the mean of the last samples."""
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + max_wait_s
    recent = []
    last_log = 0.0
    while True:
        b0, _ = cpu_ticks()
        time.sleep(1.0)
        b1, _ = cpu_ticks()
        busy = (b1 - b0) / hz
        recent = (recent + [busy])[-quiet_seconds:]
        if len(recent) == quiet_seconds and max(recent) < busy_limit:
            return sum(recent) / len(recent)
        if time.monotonic() >= deadline:
            log(f"  gave up waiting: other work uses {busy:.2f} cores")
            return sum(recent) / len(recent)
        if time.monotonic() - last_log >= 15:
            log(f"  waiting for a quieter machine: other work uses {busy:.2f} cores")
            last_log = time.monotonic()


class StageNoise:
    """CPU time used by other work while a stage runs."""

    def __init__(self, name, args):
        self.name = name
        self.busy_before = wait_for_quiet(args.quiet_wait_s, args.quiet_busy_cores)
        self.top = top_processes()
        self.started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.monotonic()
        self.b0, self.s0 = cpu_ticks()
        self.c0 = children_cpu_seconds()

    def finish(self):
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.monotonic() - self.t0
        b1, s1 = cpu_ticks()
        ours = children_cpu_seconds() - self.c0
        busy = (b1 - self.b0) / hz
        other = max(0.0, busy - ours)
        return {
            "stage": self.name,
            "started": self.started,
            "wall_seconds": round(wall, 2),
            "cores_used_by_this_run": round(ours / wall, 2) if wall > 0 else 0,
            "cores_used_by_other_work": round(other / wall, 2) if wall > 0 else 0,
            "steal_cores": round((s1 - self.s0) / hz / wall, 3) if wall > 0 else 0,
            "other_work_cores_just_before": round(self.busy_before, 2),
            "busiest_other_processes_at_start": self.top,
        }


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_congestion():
    """The TCP congestion control Tessera's loopback connections use: cubic
    where the kernel offers it (common/socket_tuning.h), else the system's.
    iperf3 runs with the same one so that the ratios compare like with like."""
    available = read_first("/proc/sys/net/ipv4/tcp_available_congestion_control").split()
    if "cubic" in available:
        return "cubic"
    return read_first("/proc/sys/net/ipv4/tcp_congestion_control", "unknown")


def run_iperf3(seconds):
    if shutil.which("iperf3") is None:
        sys.exit("error: iperf3 is missing (apt-get install iperf3; `make bench` installs it)")
    congestion = loopback_congestion()
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = None
        for _ in range(50):  # the server needs a moment to listen
            time.sleep(0.1)
            r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds),
                                "-P", "1", "-C", congestion, "-J"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                out = r.stdout
                break
        if out is None:
            sys.exit(f"error: iperf3 client failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait()
    doc = json.loads(out)
    end = doc["end"]
    return {
        "gbps_received": end["sum_received"]["bits_per_second"] / 8 / 1e9,
        "gbps_sent": end["sum_sent"]["bits_per_second"] / 8 / 1e9,
        "seconds": seconds,
        "streams": 1,
        "cpu_utilization_percent": end.get("cpu_utilization_percent", {}),
        "tcp_congestion": congestion,
        "command": f"iperf3 -s -1 -B 127.0.0.1 -p PORT; "
                   f"iperf3 -c 127.0.0.1 -p PORT -t {seconds} -P 1 -C {congestion} -J",
    }


def run_binary(cmd, out_path, merge_stdout=False, name=None):
    """Runs cmd, logs its stderr (and stdout with merge_stdout), exits on a
    non-zero status (naming it `name`, default cmd[0]), and returns the JSON
    document it wrote to out_path."""
    log("  $ " + " ".join(cmd))
    r = subprocess.run(cmd, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE, text=True)
    for line in (r.stdout if merge_stdout else r.stderr).splitlines():
        log("  | " + line)
    if r.returncode != 0:
        sys.exit(f"error: {name or cmd[0]} exited with status {r.returncode}")
    with open(out_path) as f:
        return json.load(f)


def run_e2e(args):
    out = os.path.join(args.results_dir, "fmnist_vs_ddp.json")
    cmd = ["/usr/bin/python3", os.path.join(REPO_ROOT, "bench", "fmnist_vs_ddp.py"),
           f"--build_dir={args.build_dir}", f"--epochs={args.e2e_epochs}",
           f"--seeds={args.e2e_seeds}", f"--out={out}"]
    return run_binary(cmd, out, merge_stdout=True, name="fmnist_vs_ddp.py")


def run_scaling(args):
    binary = os.path.join(args.build_dir, "bin", "tessera")
    runs = []
    for workers in args.scaling_workers:
        samples = []
        for rep in range(args.scaling_repeats):
            with tempfile.TemporaryDirectory(prefix="tessera-scaling-") as tmp:
                summary = os.path.join(tmp, "summary.json")
                cmd = [binary, "local", f"--job={FMNIST_JOB}", "--servers=2",
                       f"--workers={workers}", "--mode=sync", f"--epochs={args.scaling_epochs}",
                       f"--summary_json={summary}", f"--log_dir={tmp}"]
                log("  $ " + " ".join(cmd[:-2]))
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, timeout=1800)
                if r.returncode != 0:
                    log(r.stdout[-3000:])
                    sys.exit(f"error: tessera local with {workers} workers exited with "
                             f"status {r.returncode}")
                with open(summary) as f:
                    s = json.load(f)
                log(f"  | {workers} worker(s), run {rep + 1}: {s['samples_per_sec']:.0f} samples/s, "
                    f"test accuracy {s['test_accuracy']:.4f}, {s['wall_seconds']:.1f} s")
                samples.append(s)
        rates = sorted(s["samples_per_sec"] for s in samples)
        median = rates[len(rates) // 2] if len(rates) % 2 else 0.5 * (
            rates[len(rates) // 2 - 1] + rates[len(rates) // 2])
        runs.append({
            "workers": workers,
            "servers": 2,
            "batch_size_per_worker": samples[0].get("batch_size"),
            "epochs": args.scaling_epochs,
            "samples_per_sec_median": median,
            "samples_per_sec_runs": [s["samples_per_sec"] for s in samples],
            "test_accuracy_runs": [s["test_accuracy"] for s in samples],
            "wall_seconds_runs": [s["wall_seconds"] for s in samples],
            "steps": samples[0].get("steps"),
        })
    base = runs[0]["samples_per_sec_median"]
    for r in runs:
        r["speedup_vs_1_worker"] = r["samples_per_sec_median"] / base
    return {"job": os.path.relpath(FMNIST_JOB, REPO_ROOT), "mode": "sync", "runs": runs}


def run_scaling_caps(args):
    """bench/scaling_netns.sh; needs root for network namespaces."""
    if os.geteuid() != 0:
        log("  skipped: network namespaces need root")
        return {"skipped": "needs root for network namespaces"}
    out = os.path.join(args.results_dir, "scaling_caps.json")
    cmd = ["bash", os.path.join(REPO_ROOT, "bench", "scaling_netns.sh"),
           os.path.join(args.build_dir, "bin"), f"--out={out}"]
    log("  $ " + " ".join(cmd))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=3600)
    for line in r.stdout.splitlines():
        if not line.startswith("{"):
            log("  | " + line)
    if r.returncode == 77:
        return {"skipped": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "77"}
    if r.returncode != 0:
        sys.exit(f"error: scaling_netns.sh exited with status {r.returncode}")
    with open(out) as f:
        return json.load(f)


# Kernel and library symbols grouped by what the time is spent on.
PROFILE_CATEGORIES = (
    ("page faults: mapping and zeroing fresh memory",
     r"page_fault|clear_page|do_anonymous_page|handle_mm_fault|alloc_pages|alloc_frozen_pages|"
     r"get_page_from_freelist|rmqueue|folio|memcg|mem_cgroup|mas_walk|lru_|__pte|pmd_|"
     r"irqentry_exit_to_user_mode|__count_memcg|percpu_counter|set_pte"),
    ("unmapping and freeing memory (munmap, madvise, brk)",
     r"unmap|munmap|tlb|free_pages|release_pages|free_unref|madvise|zap_|__free|brk|"
     r"free_pcppages|__list_del_entry"),
    ("kernel socket copies (user <-> socket buffers)",
     r"_copy_to_iter|_copy_from_iter|copy_user|copy_page_to_iter|copy_page_from_iter|"
     r"skb_copy_datagram|csum_partial_copy"),
    ("kernel TCP/IP and socket calls",
     r"^tcp_|^__tcp|^ip_|^__ip|^skb_|^__skb|^sock_|^__sock|^sk_|^__sk|netif|net_rx|dev_queue|"
     r"loopback|sendmsg|recvmsg|__sys_|inet_|__napi|napi_|kmalloc|kmem_cache|__alloc_skb"),
    ("kernel scheduling, futexes and polling",
     r"schedule|futex|finish_task_switch|pick_next|enqueue|dequeue|wake_up|try_to_wake_up|"
     r"epoll|ep_poll|poll|select|hrtimer|update_curr|__switch_to|psi_|cpuacct"),
    ("memcpy/memmove in user space", r"^__memmove|^__memcpy|^memcpy|^memmove"),
    ("memset in user space", r"^__memset|^memset"),
    ("malloc/free in user space", r"malloc|^free$|^_int_|^__libc_|cfree|^operator new|"
                                  r"^operator delete|sysmalloc|systrim|tcache"),
    ("Tessera: non-finite check", r"AllFinite|PayloadFinite|Finite"),
    ("Tessera: optimizer apply", r"Optimizer::Apply"),
    ("Tessera: encode/decode and other", r"^tessera::"),
    ("protobuf", r"google::protobuf|^google::"),
    ("gRPC, Abseil and the rest of user space", r".*"),
)

KERNEL_CATEGORIES = [c for c in PROFILE_CATEGORIES
                     if c[0].startswith(("page faults", "unmapping", "kernel"))]
USER_CATEGORIES = [c for c in PROFILE_CATEGORIES if c not in KERNEL_CATEGORIES]


def summarise_perf(data):
    """Aggregates `perf script` samples per process (client = transport_bench,
    server = tessera-server) into categories and top symbols."""
    r = subprocess.run(["perf", "script", "-i", data, "--show-task-events",
                        "-F", "pid,tid,comm,ip,sym,dso"], capture_output=True, text=True)
    proc_names = {}  # pid -> program, from the exec events
    samples = []
    for line in r.stdout.splitlines():
        m = re.search(r"PERF_RECORD_COMM exec: (.*):(\d+)/\d+\s*$", line)
        if m:
            proc_names[int(m.group(2))] = m.group(1)
            continue
        if "PERF_RECORD_" in line:
            continue
        m = re.match(r"^\s*(.*?)\s+(\d+)/(\d+)\s+(.*)$", line)
        if not m:
            continue
        comm, pid, tid, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        # "<sym+off> (<dso>)" or "[unknown] (<dso>)"
        m2 = re.match(r"^\s*(?:[0-9a-f]+\s+)?(.*?)\s+\(([^)]*)\)\s*$", rest)
        sym, dso = (m2.group(1), m2.group(2)) if m2 else (rest.strip(), "")
        sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
        samples.append((pid, tid, comm, dso, sym))
    total = len(samples)
    if total == 0:
        return {"skipped": "perf recorded no samples"}
    per_process = {}
    for pid, tid, comm, dso, sym in samples:
        name = proc_names.get(pid, comm)
        if name not in ("transport_bench", "tessera-server"):
            name = "other"
        p = per_process.setdefault(name, {"samples": 0, "kernel": 0, "threads": {},
                                          "categories": {}, "symbols": {}})
        p["samples"] += 1
        kernel = "kernel" in dso or dso.startswith("[")
        p["kernel"] += kernel
        p["threads"][comm] = p["threads"].get(comm, 0) + 1
        cats = KERNEL_CATEGORIES if kernel else USER_CATEGORIES
        cat = next((c for c, pattern in cats if re.search(pattern, sym)), "other kernel")
        p["categories"][cat] = p["categories"].get(cat, 0) + 1
        key = f"{'[k] ' if kernel else ''}{sym}"
        p["symbols"][key] = p["symbols"].get(key, 0) + 1
    out = {"total_samples": total, "processes": {}}
    for name, p in per_process.items():
        pct = lambda n: round(100.0 * n / total, 1)  # share of all samples
        out["processes"][name] = {
            "percent_of_samples": pct(p["samples"]),
            "kernel_percent": pct(p["kernel"]),
            "threads": {k: pct(v) for k, v in sorted(p["threads"].items(), key=lambda x: -x[1])},
            "categories": [[pct(v), k] for k, v in
                           sorted(p["categories"].items(), key=lambda x: -x[1])],
            "top_symbols": [[pct(v), k] for k, v in
                            sorted(p["symbols"].items(), key=lambda x: -x[1])[:12]],
        }
    return out


def run_profile(args):
    """perf record of the 64 MiB push and pull loops (the client and the real
    server, which perf follows as a child), summarised per process."""
    if shutil.which("perf") is None:
        return {"skipped": "perf is not installed"}
    out = {}
    bench = os.path.join(args.build_dir, "bin", "transport_bench")
    for direction in ("push", "pull"):
        with tempfile.TemporaryDirectory(prefix="tessera-perf-") as tmp:
            data = os.path.join(tmp, "perf.data")
            result = os.path.join(tmp, "t.json")
            cmd = ["perf", "record", "-q", "-F", "999", "-o", data, "--", bench,
                   "--sizes_mib=64", f"--directions={direction}", "--noop_baseline=false",
                   "--floors=false", "--rounds=3", f"--round_mib={args.transport_round_mib}",
                   f"--out={result}"]
            log("  $ " + " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return {"skipped": f"perf record failed: {r.stderr[-300:]}"}
            summary = summarise_perf(data)
            with open(result) as f:
                summary["gbps_under_perf"] = json.load(f)["sizes"][0]["tessera"][direction][
                    "gbps_median"]
            out[direction] = summary
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def transport_rows(results):
    """One row per size with the figures and ratios the acceptance needs."""
    t = results.get("transport")
    if not t:
        return []
    iperf = results.get("iperf3_reference_gbps")
    rows = []
    for s in t["sizes"]:
        mib = s["size_mib"]
        row = {"size_mib": mib}
        for d in ("push", "pull"):
            g = s.get("tessera", {}).get(d, {}).get("gbps_median")
            noop = s.get("noop_grpc", {}).get(d, {}).get("gbps_median")
            ps = ANCHORS[f"pslite_{d}_gbps"].get(mib)
            row[d] = {
                "gbps": g,
                "noop_grpc_gbps": noop,
                "pslite_gbps": ps,
                "ratio_to_pslite": g / ps if g and ps else None,
                "ratio_to_iperf3": g / iperf if g and iperf else None,
            }
            row[d]["pass"] = bool(row[d]["ratio_to_pslite"] is not None and
                                  row[d]["ratio_to_pslite"] >= ACCEPT_PSLITE_RATIO and
                                  row[d]["ratio_to_iperf3"] >= ACCEPT_IPERF_RATIO)
        row["memcpy_warm_gbps"] = s.get("memcpy", {}).get("warm_gbps")
        row["memcpy_fresh_gbps"] = s.get("memcpy", {}).get("fresh_mmap_gbps")
        rows.append(row)
    return rows


def apply_summary(results):
    a = results.get("apply")
    if not a:
        return None
    kernels = {k["kernel"]: k for k in a["kernels"]}
    adam = kernels.get("adam")
    return {
        "memcpy_gbps": a["memcpy_gbps"],
        "adam_gbps": adam["gbps"] if adam else None,
        "adam_ratio": adam["ratio_to_memcpy"] if adam else None,
        "pass": bool(adam and adam["ratio_to_memcpy"] >= ACCEPT_ADAM_MEMCPY_RATIO),
    }


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def pass_word(ok):
    return "**pass**" if ok else "**FAIL**"


def write_plots(results, out_dir):
    """PNG plots with gnuplot; returns the files written."""
    if shutil.which("gnuplot") is None:
        log("  gnuplot missing: no plots (apt-get install gnuplot-nox)")
        return []
    written = []
    rows = transport_rows(results)
    iperf = results.get("iperf3_reference_gbps")
    if rows:
        data = os.path.join(out_dir, "transport.dat")
        with open(data, "w") as f:
            f.write("# MiB tessera_push tessera_pull noop_push noop_pull pslite_push pslite_pull\n")
            for r in rows:
                vals = [r["push"]["gbps"], r["pull"]["gbps"], r["push"]["noop_grpc_gbps"],
                        r["pull"]["noop_grpc_gbps"], r["push"]["pslite_gbps"],
                        r["pull"]["pslite_gbps"]]
                f.write(f"{r['size_mib']} " + " ".join("NaN" if v is None else f"{v:.4f}"
                                                       for v in vals) + "\n")
        png = os.path.join(out_dir, "transport.png")
        script = f"""
set terminal pngcairo size 900,560 font ',11' noenhanced
set output '{png}'
set title 'Dense push / pull, 1 server, 1 worker, 127.0.0.1 ({results["machine"]["nproc"]} cores)'
set xlabel 'payload per push or pull (MiB)'
set ylabel 'GB/s (payload bytes / wall time)'
set logscale x 2
set xrange [0.7:90]
set xtics (1, 16, 64)
set yrange [0:*]
set key outside right top
set grid
plot '{data}' using 1:2 with linespoints lw 2 pt 7 lc rgb '#c0392b' title 'Tessera push', \\
     '{data}' using 1:3 with linespoints lw 2 pt 5 lc rgb '#2471a3' title 'Tessera pull', \\
     '{data}' using 1:4 with linespoints dt 2 pt 6 lc rgb '#c0392b' title 'no-op gRPC push', \\
     '{data}' using 1:5 with linespoints dt 2 pt 4 lc rgb '#2471a3' title 'no-op gRPC pull', \\
     '{data}' using 1:6 with linespoints dt 3 lw 2 pt 9 lc rgb '#e67e22' title 'ps-lite push (anchor)', \\
     '{data}' using 1:7 with linespoints dt 3 lw 2 pt 11 lc rgb '#16a085' title 'ps-lite pull (anchor)', \\
     {iperf if iperf else 'NaN'} with lines lw 2 lc rgb 'black' title 'iperf3, this run', \\
     {0.85 * iperf if iperf else 'NaN'} with lines dt 4 lc rgb 'gray40' title '85% of iperf3', \\
     {ANCHORS['iperf3_gbps']} with lines dt 3 lc rgb 'gray60' title 'iperf3 anchor (like machine)'
"""
        if subprocess.run(["gnuplot"], input=script, text=True).returncode == 0:
            written.append(png)
        os.remove(data)
    scaling = results.get("scaling")
    if scaling:
        data = os.path.join(out_dir, "scaling.dat")
        base = scaling["runs"][0]["samples_per_sec_median"]
        with open(data, "w") as f:
            f.write("# workers samples_per_sec linear\n")
            for r in scaling["runs"]:
                f.write(f"{r['workers']} {r['samples_per_sec_median']:.1f} "
                        f"{base * r['workers']:.1f}\n")
        png = os.path.join(out_dir, "scaling.png")
        script = f"""
set terminal pngcairo size 800,520 font ',11' noenhanced
set output '{png}'
set title 'Fashion-MNIST MLP, sync, 2 servers, batch 128 per worker ({results["machine"]["nproc"]} cores)'
set xlabel 'workers'
set ylabel 'samples/s'
set xrange [0.5:4.5]
set xtics (1, 2, 4)
set yrange [0:*]
set key left top
set grid
plot '{data}' using 1:2 with linespoints lw 2 pt 7 title 'Tessera', \\
     '{data}' using 1:3 with lines dt 2 title 'linear from 1 worker'
"""
        if subprocess.run(["gnuplot"], input=script, text=True).returncode == 0:
            written.append(png)
        os.remove(data)
    a = results.get("apply")
    if a:
        data = os.path.join(out_dir, "apply.dat")
        with open(data, "w") as f:
            for k in a["kernels"]:
                f.write(f"{k['kernel']} {k['gbps']:.3f}\n")
        png = os.path.join(out_dir, "apply.png")
        script = f"""
set terminal pngcairo size 860,480 font ',11' noenhanced
set output '{png}'
set title 'Optimizer apply over 64 MiB (bytes read + written per second; _xN: N threads)'
set ylabel 'GB/s'
set style data histograms
set style fill solid 0.6 border -1
set boxwidth 0.8
set yrange [0:*]
set grid ytics
set key below
plot '{data}' using 2:xtic(1) lc rgb '#4a7ab5' title 'GB/s (bytes counted per kernel)', \\
     {a['memcpy_gbps']:.3f} with lines lw 2 lc rgb 'black' title 'memcpy, this run', \\
     {0.7 * a['memcpy_gbps']:.3f} with lines dt 2 lc rgb 'gray40' title '70% of memcpy'
"""
        if subprocess.run(["gnuplot"], input=script, text=True).returncode == 0:
            written.append(png)
        os.remove(data)
    return written


def write_report(results, path, plots):
    m = results["machine"]
    t = results.get("transport")
    L = []
    L.append("# Tessera benchmarks\n")
    L.append(f"Run {m['date']} with `make bench` (`bench/run_all.py`); every figure below "
             "except the marked anchors was measured on this machine, each stage at the time "
             "listed under 'What perturbs these figures'.\n")
    L.append("## Machine\n")
    torch = m.get("torch", {})
    L.append(md_table(["", ""], [
        ["CPU", f"{m['cpu_model']}, nproc {m['nproc']}, {m['memory_gib']} GiB"],
        ["OS", f"Debian {m['debian_version']}, Linux {m['kernel']}, TCP congestion control "
               f"{m.get('tcp_congestion_control', 'not recorded')}"],
        ["Debian libblas.so.3", f"`{m['debian_libblas']}`"],
        ["PyTorch", f"{torch.get('torch', '?')}, BLAS_INFO={torch.get('blas_info', '?')}, loads "
                    + ", ".join(f"`{p}`" for p in torch.get('blas_libraries', [])) ],
        ["Compiler", " ".join(m.get("compiler", [])) + f"; -march={m.get('build_march', '?')}"],
        ["Tools", f"{m['iperf3']}; {m['gnuplot']}"],
        ["Load average at start", ", ".join(f"{x:.2f}" for x in m["load_average_at_start"])],
        ["Source", f"commit `{m.get('source', {}).get('commit', '?')[:12]}`"
                   + (f" plus {len(m['source']['modified_files'])} modified files (listed in "
                      "results.json)" if m.get("source", {}).get("modified_files") else "")],
    ]))
    L.append("")

    summary_lines = []
    rows = transport_rows(results)
    iperf_ref = results.get("iperf3_reference_gbps")
    if rows:
        L.append("## Transport: dense push and pull, 1 server / 1 worker, 127.0.0.1\n")
        ip = results.get("iperf3", [])
        L.append("iperf3 (one TCP stream, 5 s) in this run: " +
                 ", ".join(f"{r['when']} {r['gbps_received']:.2f} GB/s" for r in ip) +
                 f"; the reference for the ratios is the higher, {iperf_ref:.2f} GB/s "
                 f"(anchor on a like machine: {ANCHORS['iperf3_gbps']} GB/s).\n")
        table = []
        for r in rows:
            for d in ("push", "pull"):
                x = r[d]
                table.append([f"{r['size_mib']} MiB", d, fmt(x["gbps"]), fmt(x["noop_grpc_gbps"]),
                              fmt(x["pslite_gbps"]), fmt(x["ratio_to_pslite"]),
                              fmt(iperf_ref), fmt(x["ratio_to_iperf3"]),
                              pass_word(x["pass"])])
        L.append(md_table(["size", "op", "Tessera GB/s", "no-op gRPC GB/s", "ps-lite GB/s (anchor)",
                           "x ps-lite (need >= 1.0)", "iperf3 GB/s", "x iperf3 (need >= 0.85)",
                           "acceptance"], table))
        L.append("")
        L.append("GB/s is parameter payload bytes (10^9 bytes) over wall time per operation, "
                 f"median of {t['rounds']} rounds. As the worker does on the stream: a push "
                 "encodes the gradients part by part into a buffer that gRPC sends from (payload "
                 "slices, no serialisation copy; parts of whole blocks of at least "
                 f"{t.get('stream_part_bytes', 4194304)} bytes, each encoded while the server "
                 "reads the one before) and waits for the acknowledgement "
                 "(`return_parameters = false`); a pull asks for parameters in parts of the same "
                 "size and decodes each into a float buffer while the next arrives. "
                 f"The job is `linear:K-1` (exactly N MiB of floats), SGD, ASYNC, one shard, "
                 f"block_bytes {t['block_bytes']}. The no-op gRPC server is the same proto "
                 "service and threading (sync gRPC `Session`) with no store behind it: a push is "
                 "parsed and acknowledged (once, after its last part), a pull answered in one "
                 "message from a prebuilt reply. It is the floor gRPC and protobuf leave for "
                 "whole messages; the gap between the two columns is Tessera's server-side work "
                 "less what the parts overlap.\n")
        # Floors in the same process.
        floor_rows = []
        for s in t["sizes"]:
            mc, pb = s.get("memcpy", {}), s.get("protobuf_cpu", {})
            floor_rows.append([f"{s['size_mib']} MiB", fmt(mc.get("warm_gbps")),
                               fmt(mc.get("fresh_mmap_gbps")), fmt(pb.get("encode_gbps")),
                               fmt(pb.get("serialize_gbps")),
                               f"{fmt(pb.get('parse_reused_gbps'))} "
                               f"({fmt(pb.get('parse_reused_faulted_bytes_per_payload_byte'))})",
                               f"{fmt(pb.get('parse_push_request_only_gbps'))} "
                               f"({fmt(pb.get('parse_push_request_only_faulted_bytes_per_payload_byte'))})",
                               fmt(pb.get("all_finite_gbps"))])
        L.append("In-process floors measured in the same run (GB/s of payload, one core; in "
                 "brackets, fresh pages faulted in per payload byte). `ClientMessage` carries the "
                 "push as a plain field (a `oneof` would be deleted by `Clear()`, and every "
                 "block's buffer reallocated), so parsing into a reused `ClientMessage` (what the "
                 "server's `Session` loop does) keeps the buffers, like the bare `PushRequest` "
                 "column:\n")
        L.append(md_table(["size", "memcpy warm", "memcpy into fresh mmap", "EncodeF32",
                           "SerializeToString", "Parse into reused ClientMessage",
                           "Parse into reused PushRequest", "AllFinite"], floor_rows))
        L.append("")
        # Phases and CPU.
        ph_rows = []
        for s in t["sizes"]:
            for target in ("tessera", "noop_grpc"):
                for d in ("push", "pull"):
                    x = s.get(target, {}).get(d)
                    if not x:
                        continue
                    p = x["phases_ms_per_op"]
                    enc = p.get("encode_ms", p.get("decode_ms"))
                    ph_rows.append([f"{s['size_mib']} MiB", target, d, fmt(x["ms_per_op"], 3),
                                    fmt(enc, 3), fmt(p["write_ms"], 3), fmt(p["read_ms"], 3),
                                    fmt(x["client_cpu_s_per_gb"], 3),
                                    fmt(x["server_cpu_s_per_gb"], 3),
                                    fmt(x.get("client_faulted_bytes_per_payload_byte")),
                                    fmt(x.get("server_faulted_bytes_per_payload_byte")),
                                    fmt(x["cpu_cores_busy"])])
        L.append("Where the time goes, per operation: client-side phases (for a push, "
                 "`Write` returns once gRPC has taken the whole message, and `Read` waits for the "
                 "server to finish receiving, parse, validate, apply and acknowledge); CPU "
                 "seconds per GB of payload (getrusage, /proc/PID/stat); fresh pages / payload is "
                 "minor page faults x 4 KiB over payload bytes, i.e. how much of the payload "
                 "lands in memory that had to be mapped and zeroed first; `cores busy` is client "
                 "+ server CPU over wall time (2 would be both cores):\n")
        L.append(md_table(["size", "server", "op", "ms/op", "encode or decode ms", "Write ms",
                           "Read ms", "client CPU s/GB", "server CPU s/GB",
                           "client fresh pages / payload", "server fresh pages / payload",
                           "cores busy"],
                          ph_rows))
        L.append("")
        tu, ts = results.get("transport_unix"), results.get("transport_shm")
        if tu or ts:
            def by_size(doc):
                return {s["size_mib"]: s for s in doc["sizes"]} if doc else {}
            unix_sizes, shm_sizes = by_size(tu), by_size(ts)
            u_rows = []
            for s in t["sizes"]:
                for d in ("push", "pull"):
                    def gbps(doc, target="tessera"):
                        return (doc or {}).get(target, {}).get(d, {}).get("gbps_median")
                    tcp_t = gbps(s)
                    uds_t = gbps(unix_sizes.get(s["size_mib"]))
                    shm_t = gbps(shm_sizes.get(s["size_mib"]))
                    anchor = ANCHORS[f"pslite_{d}_gbps"][s["size_mib"]]
                    shm_pass = (shm_t is not None and shm_t >= anchor and iperf_ref is not None
                                and shm_t >= 0.85 * iperf_ref)
                    u_rows.append([f"{s['size_mib']} MiB", d, fmt(tcp_t), fmt(uds_t),
                                   fmt(gbps(unix_sizes.get(s["size_mib"]), "noop_grpc")),
                                   fmt(shm_t), fmt(shm_t / anchor if shm_t else None),
                                   fmt(shm_t / iperf_ref if shm_t and iperf_ref else None),
                                   pass_word(shm_pass) if shm_t else "-"])
                    if shm_t:
                        summary_lines.append([f"{d} {s['size_mib']} MiB same host (shm)",
                                              f"{fmt(shm_t)} GB/s",
                                              f"{fmt(shm_t / anchor)}x ps-lite, "
                                              f"{fmt(shm_t / iperf_ref if iperf_ref else None)}x iperf3",
                                              "pass" if shm_pass else "FAIL"])
            L.append("### Same-host transports\n")
            L.append("The same loops, right after the TCP ones: over a Unix-domain socket "
                     "(`transport_bench --transport=unix`; `--listen=unix:PATH` and `unix:PATH` "
                     "addresses) and with the payloads through the same-host shared-memory "
                     "region (`--transport=shm`: TCP carries the messages, the tensor bytes go "
                     "through the region, as for every worker whose server is on its own host). "
                     "The acceptance column applies the transport criteria to the shared-memory "
                     "figures; it says nothing about other hosts, where the TCP table above "
                     "holds:\n")
            L.append(md_table(["size", "op", "Tessera TCP GB/s", "Tessera UDS GB/s",
                               "no-op gRPC UDS GB/s", "Tessera shared memory GB/s",
                               "shm x ps-lite", "shm x iperf3", "shm acceptance"], u_rows))
            L.append("")
        for r in rows:
            for d in ("push", "pull"):
                summary_lines.append([f"{d} {r['size_mib']} MiB", f"{fmt(r[d]['gbps'])} GB/s",
                                      f"{fmt(r[d]['ratio_to_pslite'])}x ps-lite, "
                                      f"{fmt(r[d]['ratio_to_iperf3'])}x iperf3",
                                      "pass" if r[d]["pass"] else "FAIL"])

    a = results.get("apply")
    if a:
        L.append("## Apply: server optimizer over 64 MiB of parameters\n")
        arows = [[k["kernel"], k["bytes_per_element"], fmt(k["ms_median"], 2),
                  fmt(k["gbps"]), fmt(k["ratio_to_memcpy"])] for k in a["kernels"]]
        L.append(md_table(["kernel", "bytes/element counted", "ms (median of "
                           f"{a['reps']})", "GB/s", "x memcpy"], arows))
        L.append("")
        s = apply_summary(results)
        L.append(f"memcpy of 64 MiB between warm buffers is counted as read + write (2 x 64 MiB): "
                 f"{a['memcpy_gbps']:.2f} GB/s, i.e. {a['memcpy_gbps'] / 2:.2f} GB/s of payload "
                 f"(anchor on a like machine: {ANCHORS['memcpy_64mib_gbps']} GB/s of payload). "
                 f"Adam: {s['adam_gbps']:.2f} GB/s = {s['adam_ratio']:.2f}x memcpy "
                 f"(need >= {ACCEPT_ADAM_MEMCPY_RATIO}): {pass_word(s['pass'])}. "
                 "`decode_f32` and `all_finite` are the other passes a push makes over its "
                 "payload on the server (copy out of the message, non-finite check). Every row "
                 "runs on one core except `sgd_xN` and `adam_xN`: the same kernels over 4 MiB "
                 "blocks shared by N threads, as a server shares a large step's blocks "
                 "(`--apply_threads`), still against one-core memcpy.\n")
        summary_lines.append(["Adam apply 64 MiB", f"{fmt(s['adam_gbps'])} GB/s",
                              f"{fmt(s['adam_ratio'])}x memcpy", "pass" if s["pass"] else "FAIL"])

    e = results.get("e2e")
    if e:
        L.append("## End to end: Fashion-MNIST vs PyTorch DDP (same data, same model)\n")
        te, dd = e["tessera"], e["ddp"]
        seeds = e.get("seeds_per_system", 1)

        def acc(r):
            if "test_accuracy_runs" not in r or len(r["test_accuracy_runs"]) == 1:
                return f"{r['test_accuracy']:.4f}"
            return (f"{r['test_accuracy']:.4f} ({r['test_accuracy_min']:.4f}-"
                    f"{r['test_accuracy_max']:.4f})")

        L.append(md_table(["system", "samples/s (median)",
                           f"test accuracy, mean (range) of {seeds} seed{'s' if seeds != 1 else ''}", "epochs"], [
            [f"Tessera, {te['servers']} servers, {te['workers']} workers, {te.get('mode')}",
             f"{te['samples_per_sec']:.0f}", acc(te), e["epochs"]],
            [f"PyTorch DDP, gloo, {dd['processes']} x {dd['threads_per_process']} thread",
             f"{dd['samples_per_sec']:.0f}", acc(dd), e["epochs"]],
            ["PyTorch DDP (anchor, reference BLAS)", f"{ANCHORS['pytorch_ddp_samples_per_sec']}",
             "0.8562", 3],
        ] + ([[f"compute alone: `compute_bench`, {te['workers']} processes, no servers",
               f"{e['compute_alone']['samples_per_sec']:.0f}", "-", e["epochs"]]]
             if "compute_alone" in e else [])))
        L.append("")
        ratio = e["ratio_tessera_over_ddp_samples_per_sec"]
        acc_ok = te["test_accuracy"] >= dd["test_accuracy"]
        L.append(f"MLP {e['model']}, Adam lr {e['optimizer']['learning_rate']}, batch "
                 f"{e['batch_size_per_worker']} per worker; each system ran {seeds} times with "
                 "its own seeds (initial weights and data order), alternating. Tessera/DDP "
                 f"samples/s (medians): {ratio:.2f} (goal 5: {pass_word(ratio >= 5)}); mean "
                 f"test accuracy {te['test_accuracy']:.4f} vs {dd['test_accuracy']:.4f} "
                 f"(equal or better: {pass_word(acc_ok)}). Tessera's samples/s is its "
                 "summary figure (whole run, including the held-out evaluation after each epoch); "
                 "DDP's covers its training loop only.\n")
        if "compute_alone" in e:
            L.append("The compute-alone row is the Tessera workers' own work (batch gathering, "
                     "forward and backward on the CPU backend, rank 0's evaluation after each "
                     "epoch) in the same number of processes with no servers and no exchange: "
                     "the most any exchange could let them reach on this machine. It is "
                     f"{e['ratio_compute_alone_over_ddp']:.2f}x DDP, and Tessera reaches "
                     f"{100 * e['ratio_tessera_over_compute_alone']:.0f}% of it.\n")
        summary_lines.append(["Fashion-MNIST e2e", f"{te['samples_per_sec']:.0f} samples/s",
                              f"{ratio:.2f}x DDP, mean acc "
                              f"{te['test_accuracy']:.4f} vs {dd['test_accuracy']:.4f}",
                              "pass" if ratio >= 5 and acc_ok else "FAIL"])

    sc = results.get("scaling")
    if sc:
        L.append("## Scaling: 1, 2, 4 workers (sync, 2 servers)\n")
        srows = [[r["workers"], f"{r['samples_per_sec_median']:.0f}",
                  fmt(r["speedup_vs_1_worker"]),
                  " / ".join(f"{x:.0f}" for x in r["samples_per_sec_runs"]),
                  " / ".join(f"{x:.4f}" for x in r["test_accuracy_runs"]),
                  r["batch_size_per_worker"] * r["workers"]] for r in sc["runs"]]
        L.append(md_table(["workers", "samples/s (median)", "x 1 worker", "runs",
                           "test accuracy", "global batch"], srows))
        L.append("")
        L.append(f"`tessera local --servers=2 --workers=W --mode=sync --epochs="
                 f"{sc['runs'][0]['epochs']}` on `{sc['job']}`; samples/s from `--summary_json` "
                 "(whole run including evaluation). Every process shares the machine's "
                 f"{m['nproc']} cores, so more workers cannot add compute here: this measures "
                 "how well the system keeps the cores busy, not cluster scaling.\n")
        for r in sc["runs"]:
            summary_lines.append([f"scaling {r['workers']} worker(s)",
                                  f"{r['samples_per_sec_median']:.0f} samples/s",
                                  f"{fmt(r['speedup_vs_1_worker'])}x 1 worker", "-"])

    caps = results.get("scaling_caps")
    if caps and "skipped" not in caps:
        L.append("## Scaling under bandwidth caps (network namespaces)\n")
        crows = [[r["rate"], r["wire_dtype"], r["workers"],
                  f"{r['samples_per_sec']:.0f}" if r["samples_per_sec"] is not None else "failed",
                  fmt(r["ratio_to_1_worker"]), r["payload_bytes_per_step"]]
                 for r in caps["runs"]]
        L.append(md_table(["cap per worker link", "wire dtype", "workers", "samples/s",
                           "x 1 worker (same cap)", "payload bytes per worker step (push + pull)"], crows))
        L.append("")
        L.append(f"`bench/scaling_netns.sh`: sync Fashion-MNIST, {caps['max_steps']} steps per "
                 "run, 2 servers and each worker in network namespaces of their own on one "
                 "bridge; `tc tbf` caps every worker's link both ways (servers uncapped). "
                 "samples/s is worker 0's summary (all workers' samples, training steps only). "
                 f"Every process still shares the machine's {m['nproc']} cores, which is what "
                 "the uncapped rows measure.\n")
        for r in caps["runs"]:
            if r["rate"] != "none" and r["workers"] == max(x["workers"] for x in caps["runs"]):
                summary_lines.append([f"scaling {r['workers']} workers, {r['rate']} {r['wire_dtype']}",
                                      f"{r['samples_per_sec'] or 0:.0f} samples/s",
                                      f"{fmt(r['ratio_to_1_worker'])}x 1 worker", "-"])

    prof = results.get("profile")
    if prof and "skipped" not in prof:
        L.append("## Where the time goes: perf profile of the 64 MiB loops\n")
        L.append("`perf record -F 999` of `transport_bench --sizes_mib=64` with one direction "
                 "at a time; perf follows the tessera-server child, so both sides of the stream "
                 "are sampled (every thread). Shares are of all samples of the run (client + "
                 "server = 100% less start-up and other work); symbols are grouped by what "
                 "they spend the time on. perf samples on a timer here, so time spent with "
                 "interrupts off is charged to where they are turned back on "
                 "(`_raw_spin_unlock_irqrestore`, `handle_softirqs`: in 'other kernel', mostly "
                 "the loopback TCP path). CPU samples do not show waiting: see `cores busy` "
                 "above.\n")
        for d in ("push", "pull"):
            p = prof.get(d)
            if not p or "processes" not in p:
                continue
            L.append(f"**{d}** ({p.get('gbps_under_perf', 0):.2f} GB/s while profiled, "
                     f"{p['total_samples']} samples):\n")
            procs = [("client", p["processes"].get("transport_bench")),
                     ("server", p["processes"].get("tessera-server"))]
            cats = {}
            for role, x in procs:
                for pct, cat in (x or {}).get("categories", []):
                    cats.setdefault(cat, {})[role] = pct
            crow = [[cat, fmt(v.get("client"), 1), fmt(v.get("server"), 1)]
                    for cat, v in sorted(cats.items(),
                                         key=lambda kv: -sum(kv[1].values()))
                    if sum(v.values()) >= 0.5]
            crow.append(["**all (kernel)**"] + [
                f"{x['percent_of_samples']:.1f} ({x['kernel_percent']:.1f})" if x else "-"
                for _, x in procs])
            L.append(md_table(["spent on", "client % of samples", "server % of samples"], crow))
            L.append("")
            srow = []
            for name in ("transport_bench", "tessera-server"):
                x = p["processes"].get(name)
                if not x:
                    continue
                role = "client" if name == "transport_bench" else "server"
                for pct, sym in x["top_symbols"][:8]:
                    srow.append([role, f"`{sym}`", f"{pct:.1f}"])
            L.append(md_table(["process", "top symbols", "% of samples"], srow))
            L.append("")

    L.append("## What perturbs these figures\n")
    L.append(f"This machine has {m['nproc']} cores shared with other work (builds, tests). "
             "Client and server of the transport stage, and every process of the training "
             "stages, compete for the same cores; so does anything else running. Each stage "
             f"waited up to {results['settings']['quiet_wait_s']:.0f} s for other work to stay "
             f"below {results['settings']['quiet_busy_cores']} cores for 5 s, then recorded how "
             "much CPU other work used while it ran (a stage that ran with other work near 1 "
             "core had about half the machine):\n")
    nrows = [[n["stage"], n.get("started", "-")[11:19], n["wall_seconds"], n["cores_used_by_this_run"],
              n["cores_used_by_other_work"], n["steal_cores"],
              ", ".join(n["busiest_other_processes_at_start"]) or "-"]
             for n in results.get("noise", [])]
    L.append(md_table(["stage", "started (UTC)", "wall s", "cores used by this run",
                       "cores used by other work",
                       "steal (cores)", "busiest other processes at start"], nrows))
    L.append("")
    L.append("Other sources: the machine is a VM, so page faults (which dominate receives into "
             "freshly mapped memory) cost more than on bare metal and the hypervisor may steal "
             "time; CPU frequency is not pinned; memcpy and apply figures depend on what else "
             "uses the memory bus; the ps-lite, iperf3 and DDP anchors were measured on a like "
             "machine, not this one, so only the figures measured here are compared for the "
             "iperf3 and memcpy ratios.\n")
    if plots:
        L.append("## Plots\n")
        for p in plots:
            L.append(f"![{os.path.basename(p)}]({os.path.basename(p)})\n")
    L.append("## Files\n")
    L.append("`results.json` (everything above, machine-readable), `transport.json`, "
             "`transport_unix.json`, `transport_shm.json`, `scaling_caps.json`, "
             "`apply.json`, `fmnist_vs_ddp.json` (the stages' own output), "
             + ", ".join(f"`{os.path.basename(p)}`" for p in plots) + ".\n")
    if os.path.exists(os.path.join(os.path.dirname(path), "analysis.md")):
        L.append("`analysis.md` reads the transport figures of a given run (its date is in "
                 "it): where the time goes and what to change.\n")
    with open(path, "w") as f:
        f.write("\n".join(L))
    return summary_lines


def print_summary(lines):
    if not lines:
        return
    header = ["benchmark", "figure", "compared with", "acceptance"]
    rows = [header] + lines
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    print()
    for i, r in enumerate(rows):
        print("  ".join(f"{str(c):<{widths[j]}}" for j, c in enumerate(r)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build_dir", default=os.path.join(REPO_ROOT, "build"))
    parser.add_argument("--results_dir", default=RESULTS_DIR)
    parser.add_argument("--only", default="",
                        help="comma-separated stages to run (default: all but profile): "
                             + ", ".join(STAGES))
    parser.add_argument("--profile", action="store_true", help="also run the perf stage")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and repeats (a smoke test, not for the record)")
    parser.add_argument("--transport_rounds", type=int, default=7)
    parser.add_argument("--transport_round_mib", type=int, default=512)
    parser.add_argument("--apply_reps", type=int, default=20)
    parser.add_argument("--iperf_seconds", type=int, default=5)
    parser.add_argument("--e2e_epochs", type=int, default=3)
    parser.add_argument("--e2e_seeds", type=int, default=5,
                        help="e2e runs per system, each with its own seed")
    parser.add_argument("--scaling_workers", default="1,2,4")
    parser.add_argument("--scaling_epochs", type=int, default=6,
                        help="epochs per scaling run (about 10 s each on 2 cores)")
    parser.add_argument("--scaling_repeats", type=int, default=3)
    parser.add_argument("--quiet_wait_s", type=float, default=120,
                        help="longest wait for a quiet machine before each stage")
    parser.add_argument("--quiet_busy_cores", type=float, default=0.3,
                        help="other work below this many cores counts as quiet")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite report.md and the plots from results.json; run nothing")
    args = parser.parse_args()
    args.build_dir = os.path.abspath(args.build_dir)
    args.results_dir = os.path.abspath(args.results_dir)
    args.scaling_workers = [int(x) for x in args.scaling_workers.split(",") if x]
    if args.quick:
        args.transport_rounds, args.transport_round_mib = 3, 128
        args.apply_reps, args.iperf_seconds = 5, 2
        args.e2e_epochs, args.e2e_seeds = 1, 1
        args.scaling_epochs, args.scaling_repeats = 1, 1
        args.quiet_wait_s = 5
    stages = [s for s in (args.only.split(",") if args.only else STAGES) if s]
    for s in stages:
        if s not in STAGES:
            parser.error(f"unknown stage '{s}' (stages: {', '.join(STAGES)})")
    if not args.only and not args.profile:
        stages.remove("profile")
    if args.profile and "profile" not in stages:
        stages.append("profile")
    if args.report_only:
        with open(os.path.join(args.results_dir, "results.json")) as f:
            results = json.load(f)
        plots = write_plots(results, args.results_dir)
        print_summary(write_report(results, os.path.join(args.results_dir, "report.md"), plots))
        return
    for b in ("transport_bench", "apply_bench", "tessera", "tessera-server"):
        if not os.access(os.path.join(args.build_dir, "bin", b), os.X_OK):
            sys.exit(f"error: {args.build_dir}/bin/{b} is missing; build first (make build)")
    os.makedirs(args.results_dir, exist_ok=True)

    # One benchmark run at a time on this machine.
    lock = open(os.path.join(tempfile.gettempdir(), "tessera-bench.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log("another benchmark run holds /tmp/tessera-bench.lock; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)

    log("machine description")
    results = {
        "benchmark": "tessera",
        "machine": machine_info(args.build_dir),
        "anchors": {k: ({str(s): v for s, v in x.items()} if isinstance(x, dict) else x)
                    for k, x in ANCHORS.items()},
        "acceptance": {"pslite_ratio": ACCEPT_PSLITE_RATIO, "iperf3_ratio": ACCEPT_IPERF_RATIO,
                       "adam_memcpy_ratio": ACCEPT_ADAM_MEMCPY_RATIO},
        "settings": dict(vars(args)),
        "stages": stages,
        "noise": [],
    }
    # Keep what earlier runs measured for stages not run now.
    previous = os.path.join(args.results_dir, "results.json")
    if args.only and os.path.exists(previous):
        with open(previous) as f:
            old = json.load(f)
        for key in ("iperf3", "iperf3_reference_gbps", "transport", "transport_unix",
                    "transport_shm", "apply",
                    "e2e", "scaling", "scaling_caps", "profile"):
            if key in old:
                results[key] = old[key]
        results["noise"] = [n for n in old.get("noise", [])
                            if n["stage"].split(" ")[0] not in stages]

    def stage(name, fn):
        log(f"== {name}")
        noise = StageNoise(name, args)
        value = fn()
        n = noise.finish()
        log(f"  ({n['wall_seconds']} s; other work used {n['cores_used_by_other_work']} cores)")
        results["noise"].append(n)
        return value

    if "iperf3" in stages:
        results["iperf3"] = []
        r = stage("iperf3 before", lambda: run_iperf3(args.iperf_seconds))
        r["when"] = "before transport"
        results["iperf3"].append(r)
        log(f"  iperf3: {r['gbps_received']:.2f} GB/s")
    if "transport" in stages:
        out = os.path.join(args.results_dir, "transport.json")
        results["transport"] = stage("transport", lambda: run_binary(
            [os.path.join(args.build_dir, "bin", "transport_bench"),
             f"--bin_dir={os.path.join(args.build_dir, 'bin')}",
             "--sizes_mib=" + ",".join(map(str, SIZES_MIB)),
             f"--rounds={args.transport_rounds}", f"--round_mib={args.transport_round_mib}",
             f"--out={out}"], out))
    if "iperf3" in stages:
        r = stage("iperf3 after", lambda: run_iperf3(args.iperf_seconds))
        r["when"] = "after transport"
        results["iperf3"].append(r)
        log(f"  iperf3: {r['gbps_received']:.2f} GB/s")
    for kind in ("unix", "shm"):
        name = f"transport_{kind}"
        if name not in stages:
            continue
        out = os.path.join(args.results_dir, f"{name}.json")
        results[name] = stage(name, lambda: run_binary(
            [os.path.join(args.build_dir, "bin", "transport_bench"),
             f"--bin_dir={os.path.join(args.build_dir, 'bin')}", f"--transport={kind}",
             "--floors=false", "--sizes_mib=" + ",".join(map(str, SIZES_MIB)),
             f"--rounds={args.transport_rounds}", f"--round_mib={args.transport_round_mib}",
             f"--out={out}"], out))
    if results.get("iperf3"):
        results["iperf3_reference_gbps"] = max(r["gbps_received"] for r in results["iperf3"])
    if "apply" in stages:
        out = os.path.join(args.results_dir, "apply.json")
        results["apply"] = stage("apply", lambda: run_binary(
            [os.path.join(args.build_dir, "bin", "apply_bench"), f"--reps={args.apply_reps}",
             f"--out={out}"], out))
    if "e2e" in stages:
        results["e2e"] = stage("e2e", lambda: run_e2e(args))
    if "scaling" in stages:
        results["scaling"] = stage("scaling", lambda: run_scaling(args))
    if "scaling_caps" in stages:
        results["scaling_caps"] = stage("scaling_caps", lambda: run_scaling_caps(args))
    if "profile" in stages:
        results["profile"] = stage("profile", lambda: run_profile(args))

    results["transport_summary"] = transport_rows(results)
    results["apply_summary"] = apply_summary(results)
    plots = write_plots(results, args.results_dir)
    report = os.path.join(args.results_dir, "report.md")
    summary = write_report(results, report, plots)
    with open(os.path.join(args.results_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    log(f"wrote {report}, {os.path.join(args.results_dir, 'results.json')}"
        + "".join(f", {p}" for p in plots))
    print_summary(summary)


if __name__ == "__main__":
    main()
