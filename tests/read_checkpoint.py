#!/usr/bin/python3
"""Reads a Tessera checkpoint folder with NumPy alone (no Tessera code) and
writes every parameter, concatenated in model order, as raw float32.

safetensors is an 8-byte little-endian header length, a JSON header and raw
bytes; tensors are named "<param>@<offset>" (blocks of a parameter) and the
metadata holds each parameter's shape under "shape/<param>".

Usage: read_checkpoint.py STEP_DIR PARAM_NAME[,PARAM_NAME...] OUT.f32
"""
import glob
import json
import struct
import sys

import numpy as np


def read(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, t in header.items():
        assert t["dtype"] == "F32", name
        begin, end = t["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], dtype="<f4").reshape(t["shape"])
    return meta, tensors


def main():
    step_dir, names, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    blocks, shapes = {}, {}
    files = sorted(glob.glob(step_dir + "/shard-*.safetensors"))
    assert files, "no shard files in " + step_dir
    for path in files:
        meta, tensors = read(path)
        for key, value in meta.items():
            if key.startswith("shape/"):
                shapes[key[len("shape/"):]] = [int(d) for d in value.split(",")]
        for name, array in tensors.items():
            if "/" in name:
                continue  # optimizer slots
            param, offset = name.rsplit("@", 1)
            blocks.setdefault(param, []).append((int(offset), array))
    parts = []
    for param in names:
        flat = np.concatenate([a for _, a in sorted(blocks[param], key=lambda b: b[0])])
        parts.append(flat.reshape(shapes[param]).ravel())
    np.concatenate(parts).astype("<f4").tofile(out)
    print("read %d parameters from %d files" % (sum(p.size for p in parts), len(files)))


if __name__ == "__main__":
    main()
