#!/usr/bin/env python3
"""Reads packet captures of one TCP sender and its receiver and reports the
sender's retransmission stalls: times it sent nothing for more than
--gap_ms and then resent data it had sent before (a timer firing: the
retransmission timeout or a tail-loss probe, not a fast retransmission,
which an acknowledgement prompts at once).

For each stall it tells
  - whether new data followed within 2 ms of the resend (the stall fell in
    the middle of a message) or not (at its end, or the sender had nothing
    more);
  - whether the receiver had acknowledged the resent segment before the
    resend (its acknowledgement was lost on the way back) or not (the
    segment, or its earlier retransmission, never arrived).

Input: `tcpdump -tt -nn -S -r FILE` text of a capture taken in the
sender's namespace and one taken in the receiver's, both before any
iptables drop (tcpdump sees a packet before netfilter's INPUT chain).

Usage: stalls.py SENDER.txt RECEIVER.txt --port=7070 [--side=client] [--gap_ms=5]
--port is the server's port. With --side=client the client is the sender
(its segments to --port, the server's acknowledgements from it); with
--side=server the server is (its segments from --port). Prints one line of
figures; exits 1 when the sender's capture has no data segment.
"""
import argparse
import re
import statistics
import sys

PACKET = re.compile(
    r"^(\d+\.\d+) .*? \S+\.(\d+) > \S+\.(\d+): Flags \[[^\]]*\]"
    r"(?:, seq (\d+)(?::(\d+))?)?(?:, ack (\d+))?.*?length (\d+)")


def packets(path):
    """(time, src_port, dst_port, seq_begin, seq_end, ack, length) per line."""
    out = []
    with open(path) as f:
        for line in f:
            m = PACKET.search(line)
            if not m:
                continue
            out.append((float(m.group(1)), int(m.group(2)), int(m.group(3)),
                        int(m.group(4) or 0), int(m.group(5) or 0),
                        int(m.group(6)) if m.group(6) else None, int(m.group(7))))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sender")
    ap.add_argument("receiver")
    ap.add_argument("--port", type=int, required=True, help="the server's port")
    ap.add_argument("--side", choices=("client", "server"), default="client",
                    help="which end of the connections sends (default client)")
    ap.add_argument("--gap_ms", type=float, default=5.0,
                    help="silence that counts as a stall (default 5)")
    args = ap.parse_args()

    # A connection is named by its client's port.
    client = args.side == "client"
    sent = [(p[0], p[1] if client else p[2]) + p[3:] for p in packets(args.sender)
            if (p[2] if client else p[1]) == args.port and p[6] > 0]
    acks = {}
    for p in packets(args.receiver):
        if (p[1] if client else p[2]) == args.port and p[5] is not None:
            acks.setdefault(p[2] if client else p[1], []).append((p[0], p[5]))
    if not sent:
        print(f"stalls.py: no data segment of the {args.side} side of port {args.port} "
              f"in {args.sender}", file=sys.stderr)
        return 1

    last, highest = {}, {}
    gaps, mid, end, ack_lost, data_lost = [], 0, 0, 0, 0
    for i, (t, conn, begin, stop, _, _) in enumerate(sent):
        if conn in last and t - last[conn] > args.gap_ms / 1e3 and stop <= highest[conn]:
            gaps.append(1e3 * (t - last[conn]))
            followed = False
            for p in sent[i + 1:]:
                if p[0] - t >= 0.002:
                    break
                if p[1] == conn and p[3] > highest[conn]:
                    followed = True
                    break
            mid += followed
            end += not followed
            # Acknowledged by the receiver between the last send and the resend?
            acked = any(last[conn] - 0.002 < ta < t and a >= stop for ta, a in acks.get(conn, []))
            ack_lost += acked
            data_lost += not acked
        last[conn] = t
        highest[conn] = max(highest.get(conn, 0), stop)

    if not gaps:
        print(f"0 stalls over {args.gap_ms:g} ms in {len(sent)} data segments")
        return 0
    gaps.sort()
    print(f"{len(gaps)} stalls over {args.gap_ms:g} ms in {len(sent)} data segments: "
          f"median {statistics.median(gaps):.1f} ms, shortest {gaps[0]:.1f}, longest {gaps[-1]:.1f}; "
          f"new data followed the resend in {mid} (mid-message), not in {end}; "
          f"the receiver had acknowledged the resent segment in {ack_lost} (acknowledgement lost), "
          f"not in {data_lost} (segment lost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
