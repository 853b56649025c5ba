#!/usr/bin/python3
"""Reads TensorBoard event files without Tessera's code.

Usage: read_tfevents.py FILE_OR_FOLDER...

Splits each file into TFRecord records, checks both masked CRC-32C values of
every record, parses each record as a TensorBoard `Event` and prints:

    file_version brain.Event:2
    scalar STEP TAG VALUE

one line per event. Exits 1 with a line naming the file and byte offset on
the first bad record. Needs only the `protobuf` package (Debian:
python3-protobuf); the message classes are built here from a descriptor that
follows TensorFlow's event.proto and summary.proto, so nothing is generated
from Tessera's own .proto file.
"""

import os
import struct
import sys

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool

try:  # protobuf >= 4.21.
    from google.protobuf.message_factory import GetMessageClass as _message_class
except ImportError:  # older releases
    from google.protobuf import message_factory as _mf

    def _message_class(descriptor):
        return _mf.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_class():
    """Event as in tensorflow/core/util/event.proto (the fields used here)."""
    fdp = descriptor_pb2.FileDescriptorProto()
    fdp.name = "tensorflow_event_subset.proto"
    fdp.package = "tensorflow"
    fdp.syntax = "proto3"
    F = descriptor_pb2.FieldDescriptorProto

    summary = fdp.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.oneof_decl.add(name="value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT,
                    label=F.LABEL_OPTIONAL, oneof_index=0)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE,
                      label=F.LABEL_REPEATED, type_name=".tensorflow.Summary.Value")

    event = fdp.message_type.add(name="Event")
    event.oneof_decl.add(name="what")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING,
                    label=F.LABEL_OPTIONAL, oneof_index=0)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    oneof_index=0, type_name=".tensorflow.Summary")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return _message_class(pool.FindMessageTypeByName("tensorflow.Event"))


class BadRecord(Exception):
    pass


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    at = 0
    while at < len(data):
        if len(data) - at < 12:
            raise BadRecord(f"{path}: byte {at}: truncated record header")
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        if length_crc != masked_crc32c(header):
            raise BadRecord(f"{path}: byte {at}: length CRC mismatch")
        end = at + 12 + length
        if end + 4 > len(data):
            raise BadRecord(f"{path}: byte {at}: record of {length} bytes is truncated")
        payload = data[at + 12:end]
        (data_crc,) = struct.unpack("<I", data[end:end + 4])
        if data_crc != masked_crc32c(payload):
            raise BadRecord(f"{path}: byte {at}: data CRC mismatch")
        yield at, payload
        at = end + 4


def event_files(args):
    for arg in args:
        if os.path.isdir(arg):
            for name in sorted(os.listdir(arg)):
                if "tfevents" in name:
                    yield os.path.join(arg, name)
        else:
            yield arg


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    event_cls = _event_class()
    count = 0
    try:
        for path in event_files(argv[1:]):
            for offset, payload in records(path):
                event = event_cls()
                try:
                    event.ParseFromString(payload)
                except Exception as e:  # DecodeError, differently named by version
                    raise BadRecord(f"{path}: byte {offset}: not an Event: {e}")
                what = event.WhichOneof("what")
                if what == "file_version":
                    print(f"file_version {event.file_version}")
                elif what == "summary":
                    for v in event.summary.value:
                        if v.WhichOneof("value") == "simple_value":
                            print(f"scalar {event.step} {v.tag} {v.simple_value:.9g}")
                count += 1
    except (BadRecord, OSError) as e:
        print(f"read_tfevents.py: {e}", file=sys.stderr)
        return 1
    if count == 0:
        print("read_tfevents.py: no events found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
