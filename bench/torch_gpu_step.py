#!/usr/bin/env python3
"""PyTorch twin of bench/gpu_step_bench.cc: the same MLPs, batches and GEMM
precisions, forward + backward (gradients ready, no optimizer) on the GPU.

Three figures per case, each the median wall-clock time of one step with a
device synchronize at its end (as the C++ backend's call returns only when
the gradients are in host memory):
  torch-eager        eager forward + backward, parameters and data on the GPU
  torch-graph        the same step captured once in a CUDA graph and replayed
  torch-graph-host   torch-graph plus the copies a host-memory interface
                     needs: parameters in from, gradients out to, pageable
                     host tensors (what tessera's ComputeGradients does)

Usage: python3 bench/torch_gpu_step.py [--runs 200]
Prints "RESULT <variant> <model> <batch> <precision> <ms>" lines.
"""

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

CASES = [
    ("mlp:784-256-128-10", 128, "fp32"),
    ("mlp:784-256-128-10", 128, "bf16"),
    ("mlp:784-4096-4096-4096-10", 1024, "fp32"),
    ("mlp:784-4096-4096-4096-10", 1024, "tf32"),
    ("mlp:784-4096-4096-4096-10", 1024, "bf16"),
]


def build(spec):
    sizes = [int(s) for s in spec.split(":")[1].split("-")]
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).cuda(), sizes


def autocast(precision):
    if precision == "bf16":
        # Graph capture needs the autocast weight cache off.
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def median_ms(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(spec, batch, precision, runs):
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.manual_seed(0)
    model, sizes = build(spec)
    x = torch.rand(batch, sizes[0], device="cuda")
    y = torch.randint(0, sizes[-1], (batch,), device="cuda")
    params = list(model.parameters())
    warmup = max(10, runs // 10)

    def eager_step():
        model.zero_grad(set_to_none=True)
        with autocast(precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    eager = median_ms(eager_step, runs, warmup)

    # Warm up on a side stream, then capture forward + backward with the
    # gradients unset, so backward allocates them from the graph's pool.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager_step()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with autocast(precision):
            static_loss = F.cross_entropy(model(x), y)
        static_loss.backward()
    graphed = median_ms(graph.replay, runs, warmup)

    host_params = [p.detach().cpu() for p in params]  # pageable
    host_grads = [torch.empty_like(h) for h in host_params]

    def graph_with_host_copies():
        with torch.no_grad():
            for p, h in zip(params, host_params):
                p.copy_(h)
        graph.replay()
        for h, p in zip(host_grads, params):
            h.copy_(p.grad)

    graphed_host = median_ms(graph_with_host_copies, runs, warmup)
    n_params = sum(p.numel() for p in params)
    print(f"{spec} batch {batch} {precision}: eager {eager:.3f} ms, graph "
          f"{graphed:.3f} ms, graph + host copies {graphed_host:.3f} ms "
          f"({n_params} params, loss {static_loss.item():.4f})")
    for variant, ms in (("torch-eager", eager), ("torch-graph", graphed),
                        ("torch-graph-host", graphed_host)):
        print(f"RESULT {variant} {spec} {batch} {precision} {ms:.4f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch_gpu_step.py: no CUDA device visible to PyTorch")
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name()}")
    for spec, batch, precision in CASES:
        run_case(spec, batch, precision, args.runs)


if __name__ == "__main__":
    main()
