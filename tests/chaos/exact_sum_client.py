#!/usr/bin/python3
"""Exact-sum worker for tests/chaos/exact_sum.sh.

Speaks the Session protocol of proto/tessera.proto to every shard the way
tessera-worker does (Register with the coordinator for an incarnation, one
long-lived stream per shard, Hello first, pushes with a step number), but
pushes a gradient of exactly 1.0 in every element for steps 0..N-1. With
SGD at learning rate 1 in ASYNC mode each applied push lowers every
parameter of the shard by exactly 1, so the change of the shard's param_sum
(ShardStats) counts the applied pushes.

Every request has a deadline (--deadline_s); a failed request reopens the
stream with exponential backoff (50 ms doubling to 2 s) and sends the same
step again, as tessera-worker does: exactly-once apply on the server must
turn the resend of a push whose reply was lost into an acknowledged
duplicate. Writes the counts as JSON to --out.

Needs python3-grpcio and python3-protobuf (Debian), and tessera_pb2.py made
by `protoc --python_out` in --pb_dir.
"""

import argparse
import json
import queue
import struct
import sys
import threading
import time

import grpc


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pb_dir", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--servers", required=True, help="host:port,... in shard order")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--stats", action="store_true",
                   help="print every shard's ShardStats as JSON and exit")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--interval_s", type=float, default=0.02, help="pause between steps")
    p.add_argument("--deadline_s", type=float, default=3.0)
    p.add_argument("--give_up_s", type=float, default=120.0)
    p.add_argument("--out", default="")
    return p.parse_args()


def job_hash(pb, path):
    """FNV-1a of the deterministic serialization, as common/job_spec.cc does."""
    from google.protobuf import text_format
    job = pb.JobSpec()
    with open(path) as f:
        text_format.Parse(f.read(), job)
    h = 1469598103934665603
    for c in job.SerializeToString(deterministic=True):
        h ^= c
        h = (h * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# The Session protocol this client speaks: kSessionProtocolVersion in common/protocol.h.
SESSION_PROTOCOL_VERSION = 1
RETRYABLE_CODES = {1, 4, 10, 14}  # CANCELLED, DEADLINE_EXCEEDED, ABORTED, UNAVAILABLE


class Retryable(Exception):
    pass


class ShardStream:
    def __init__(self, pb, address, shard, hello, stats):
        self.pb = pb
        self.address = address
        self.shard = shard
        self.hello = hello
        self.stats = stats
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.session = self.channel.stream_stream(
            "/tessera.v1.ParameterService/Session",
            request_serializer=pb.ClientMessage.SerializeToString,
            response_deserializer=pb.ServerMessage.FromString)
        self.call = None
        self.requests = None
        self.next_id = 1
        self.blocks = None  # [(block_id, num_elements)]

    def _open(self, deadline_s):
        self.requests = queue.Queue()
        q = self.requests

        def gen():
            while True:
                m = q.get()
                if m is None:
                    return
                yield m

        self.call = self.session(gen())
        msg = self.pb.ClientMessage()
        msg.hello.CopyFrom(self.hello)
        self._exchange(msg, deadline_s)

    def close(self):
        if self.call is not None:
            self.requests.put(None)
            self.call.cancel()
            self.call = None

    def _exchange(self, msg, deadline_s):
        msg.request_id = self.next_id
        self.next_id += 1
        start = time.monotonic()
        self.requests.put(msg)
        timer = threading.Timer(deadline_s, self.call.cancel)
        timer.start()
        try:
            reply = next(self.call)
        except grpc.RpcError as e:
            self.stats["failed_call_s"].append(time.monotonic() - start)
            self.call = None
            raise Retryable(f"{e.code().name}: {e.details()}")
        except StopIteration:
            self.stats["failed_call_s"].append(time.monotonic() - start)
            self.call = None
            raise Retryable("stream closed by the server")
        finally:
            timer.cancel()
        if reply.request_id != msg.request_id:
            raise RuntimeError(f"reply to request {reply.request_id}, expected {msg.request_id}")
        if reply.code != 0:
            if reply.code in RETRYABLE_CODES:
                raise Retryable(f"code {reply.code}: {reply.message}")
            raise RuntimeError(f"shard {self.shard}: code {reply.code}: {reply.message}")
        return reply

    def call_with_retry(self, make_msg, deadline_s, give_up_s):
        give_up = time.monotonic() + give_up_s
        backoff = 0.05
        while True:
            try:
                if self.call is None:
                    self.stats["opens"] += 1
                    self._open(deadline_s)
                return self._exchange(make_msg(), deadline_s)
            except Retryable as e:
                self.stats["retries"] += 1
                self.stats["last_error"] = f"shard {self.shard}: {e}"
                self.close()
                if time.monotonic() + backoff > give_up:
                    raise RuntimeError(f"shard {self.shard}: gave up: {e}")
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


def shard_stats(pb, servers, deadline_s):
    out = []
    for address in servers:
        ch = grpc.insecure_channel(address)
        rpc = ch.unary_unary("/tessera.v1.ParameterService/ShardStats",
                             request_serializer=pb.ShardStatsRequest.SerializeToString,
                             response_deserializer=pb.ShardStatsResponse.FromString)
        r = rpc(pb.ShardStatsRequest(), timeout=deadline_s)
        out.append({"shard": r.shard, "version": r.version, "pushes_applied": r.pushes_applied,
                    "pushes_duplicate": r.pushes_duplicate,
                    "requests_rejected": r.requests_rejected, "param_sum": r.param_sum,
                    "param_bytes": r.param_bytes, "live_workers": r.live_workers})
        ch.close()
    return out


def main():
    args = parse_args()
    sys.path.insert(0, args.pb_dir)
    import tessera_pb2 as pb

    if args.stats:
        print(json.dumps(shard_stats(pb, args.servers.split(","), args.deadline_s)))
        return

    servers = args.servers.split(",")
    coord = grpc.insecure_channel(servers[0], options=CHANNEL_OPTIONS)
    # The job hash: the coordinator's (JobStatus), so that defaults the
    # servers fill in need not be repeated here; the file's own hash is
    # reported beside it.
    job_status = coord.unary_unary(
        "/tessera.v1.CoordinatorService/JobStatus",
        request_serializer=pb.JobStatusRequest.SerializeToString,
        response_deserializer=pb.JobStatusResponse.FromString)
    give_up = time.monotonic() + args.give_up_s
    while True:
        try:
            h = job_status(pb.JobStatusRequest(), timeout=args.deadline_s).job_hash
            break
        except grpc.RpcError as e:
            if time.monotonic() > give_up:
                raise SystemExit(f"job status: {e.code().name}: {e.details()}")
            time.sleep(0.2)
    stats = {"worker": args.worker, "job_hash": str(h), "file_hash": str(job_hash(pb, args.job)),
             "opens": 0, "retries": 0, "failed_call_s": [], "last_error": ""}

    # Incarnation from the coordinator (shard 0), retried like the rest.
    register = coord.unary_unary(
        "/tessera.v1.CoordinatorService/Register",
        request_serializer=pb.RegisterRequest.SerializeToString,
        response_deserializer=pb.RegisterResponse.FromString)
    while True:
        try:
            reg = register(pb.RegisterRequest(worker_id=args.worker, job_hash=h),
                           timeout=args.deadline_s)
            break
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    or time.monotonic() > give_up:
                raise SystemExit(f"register: {e.code().name}: {e.details()}")
            time.sleep(0.2)
    stats["incarnation"] = reg.incarnation

    streams = []
    for s, address in enumerate(servers):
        # protocol_version: kSessionProtocolVersion in common/protocol.h.
        hello = pb.Hello(worker_id=args.worker, incarnation=reg.incarnation, job_hash=h, shard=s,
                         protocol_version=SESSION_PROTOCOL_VERSION)
        streams.append(ShardStream(pb, address, s, hello, stats))

    # Learn each shard's blocks from a pull.
    for st in streams:
        def pull():
            m = pb.ClientMessage()
            m.pull.step = 0
            return m
        reply = st.call_with_retry(pull, args.deadline_s, args.give_up_s)
        st.blocks = [(b.block_id, len(b.data) // 4) for b in reply.pull.blocks]
    stats["elements_per_shard"] = [sum(n for _, n in st.blocks) for st in streams]

    acked = [0] * len(streams)
    applied = [0] * len(streams)
    duplicate = [0] * len(streams)
    t0 = time.monotonic()
    for step in range(args.steps):
        for i, st in enumerate(streams):
            def push():
                m = pb.ClientMessage()
                m.push.step = step
                m.push.return_parameters = False
                for block_id, n in st.blocks:
                    m.push.blocks.add(block_id=block_id, dtype=pb.F32,
                                      data=struct.pack("<%df" % n, *([1.0] * n)))
                return m
            reply = st.call_with_retry(push, args.deadline_s, args.give_up_s)
            acked[i] += 1
            if reply.push.applied:
                applied[i] += 1
            else:
                duplicate[i] += 1
        if args.interval_s > 0:
            time.sleep(args.interval_s)
    for st in streams:
        st.close()
    stats.update({
        "steps": args.steps, "acknowledged": acked, "acked_applied": applied,
        "acked_duplicate": duplicate, "seconds": round(time.monotonic() - t0, 2),
        "max_failed_call_s": round(max(stats["failed_call_s"], default=0), 2),
        "failed_calls": len(stats["failed_call_s"]),
    })
    del stats["failed_call_s"]
    with open(args.out, "w") as f:
        json.dump(stats, f)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
