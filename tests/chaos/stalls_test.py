#!/usr/bin/env python3
"""Checks tests/chaos/stalls.py on hand-written tcpdump lines.

Client 10.0.0.2:40000 sends to server 10.0.0.1:7070. Four stalls:
  1. segment 1000:2000 lost, resent 20 ms later, new data right after
     (mid-message, segment lost);
  2. segment 3000:4000 arrives, its acknowledgement is lost, resent 15 ms
     later, new data right after (mid-message, acknowledgement lost);
  3. segment 6000:7000 lost, resent 12 ms later, new data right after
     (mid-message, segment lost);
  4. segments 8000:10000 lost, both resent 16 ms later, nothing new after
     (end, segment lost);
and a fast retransmission 0.2 ms after its original, which is no stall.
Exits 0 when stalls.py reports exactly that for the client side, and no
stall for the server side (which sends one segment).
"""
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

C2S = "{t} IP 10.0.0.2.40000 > 10.0.0.1.7070: Flags [P.], seq {b}:{e}, ack 1, win 500, length {n}"
S2C_ACK = "{t} IP 10.0.0.1.7070 > 10.0.0.2.40000: Flags [.], ack {a}, win 500, length 0"
S2C_DATA = "{t} IP 10.0.0.1.7070 > 10.0.0.2.40000: Flags [P.], seq 1:101, ack {a}, win 500, length 100"


def seg(t, b, e):
    return C2S.format(t=f"{t:.6f}", b=b, e=e, n=e - b)


def ack(t, a):
    return S2C_ACK.format(t=f"{t:.6f}", a=a)


def main():
    client = [
        seg(100.000000, 0, 1000),
        seg(100.000100, 1000, 2000),       # lost
        seg(100.020100, 1000, 2000),       # stall 1 (20 ms)
        seg(100.020200, 2000, 3000),       # new data
        seg(100.030000, 3000, 4000),       # arrives; its acknowledgement is lost
        seg(100.045000, 3000, 4000),       # stall 2 (15 ms)
        seg(100.045100, 4000, 5000),       # new data
        seg(100.050000, 5000, 6000),       # lost
        seg(100.050200, 5000, 6000),       # fast retransmission: no stall
        seg(100.060000, 6000, 7000),       # lost
        seg(100.072000, 6000, 7000),       # stall 3 (12 ms)
        seg(100.072100, 7000, 8000),       # new data
        seg(100.080000, 8000, 9000),       # lost
        seg(100.080100, 9000, 10000),      # lost
        seg(100.096100, 8000, 9000),       # stall 4 (16 ms)
        seg(100.096200, 9000, 10000),      # resent too: old data, not new
    ]
    server = [
        ack(100.000050, 1000),
        ack(100.020150, 2000),
        ack(100.020250, 3000),
        ack(100.030050, 4000),             # lost on the way back
        ack(100.045050, 4000),
        ack(100.045150, 5000),
        S2C_DATA.format(t="100.046000", a=5000),
        ack(100.050250, 6000),
        ack(100.072050, 7000),
        ack(100.072150, 8000),
        ack(100.096150, 9000),
        ack(100.096250, 10000),
    ]
    with tempfile.TemporaryDirectory() as d:
        c, s = os.path.join(d, "c.txt"), os.path.join(d, "s.txt")
        with open(c, "w") as f:
            f.write("\n".join(client + server) + "\n")  # the client sees both ways
        with open(s, "w") as f:
            f.write("\n".join(client + server) + "\n")
        run = lambda *a: subprocess.run(
            [sys.executable, os.path.join(HERE, "stalls.py"), *a, "--port=7070"],
            capture_output=True, text=True)
        got = run(c, s, "--side=client")
        print(got.stdout, got.stderr, end="")
        want = ("4 stalls over 5 ms in 16 data segments: median 15.5 ms, shortest 12.0, "
                "longest 20.0; new data followed the resend in 3 (mid-message), not in 1; "
                "the receiver had acknowledged the resent segment in 1 (acknowledgement lost), "
                "not in 3 (segment lost)")
        if got.returncode != 0 or got.stdout.strip() != want:
            print(f"FAIL client side: want\n{want}")
            return 1
        got = run(s, c, "--side=server")
        print(got.stdout, got.stderr, end="")
        if got.returncode != 0 or got.stdout.strip() != "0 stalls over 5 ms in 1 data segments":
            print("FAIL server side: want no stall in 1 data segment")
            return 1
        got = run(os.devnull, s, "--side=client")
        if got.returncode != 1 or "no data segment" not in got.stderr:
            print("FAIL: an empty capture must exit 1 naming the problem")
            return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
