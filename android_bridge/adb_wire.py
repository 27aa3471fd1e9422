"""Bytes of the adb transport (device side), in one place.

A packet is a 24-byte header of six little-endian uint32 -- command, arg0, arg1, data
length, data check, magic (= command ^ 0xffffffff) -- followed by the data. The check is
an unsigned byte sum of the data; from protocol version 0x01000001 on it is not checked
and we send 0. The sync sub-protocol (push/pull/stat/list) runs inside a stream as
``id(4 ASCII) + uint32 length`` records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

A_CNXN = 0x4E584E43
A_AUTH = 0x48545541
A_OPEN = 0x4E45504F
A_OKAY = 0x59414B4F
A_CLSE = 0x45534C43
A_WRTE = 0x45545257

VERSION = 0x01000001  # no data checksums
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024

AUTH_TOKEN = 1
AUTH_SIGNATURE = 2
AUTH_RSAPUBLICKEY = 3

HEADER = struct.Struct("<6I")

NAMES = {
    A_CNXN: "CNXN",
    A_AUTH: "AUTH",
    A_OPEN: "OPEN",
    A_OKAY: "OKAY",
    A_CLSE: "CLSE",
    A_WRTE: "WRTE",
}


class WireError(Exception):
    """The peer sent something that is not an adb packet."""


@dataclass
class Packet:
    command: int
    arg0: int
    arg1: int
    data: bytes = b""

    @property
    def name(self) -> str:
        return NAMES.get(self.command, hex(self.command))


def encode_packet(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    return HEADER.pack(command, arg0, arg1, len(data), 0, command ^ 0xFFFFFFFF) + data


def decode_header(raw: bytes) -> tuple[int, int, int, int]:
    """-> (command, arg0, arg1, data length); raises WireError on a bad magic."""
    command, arg0, arg1, length, _check, magic = HEADER.unpack(raw)
    if magic != command ^ 0xFFFFFFFF:
        raise WireError(f"bad packet magic for command {command:#x}")
    if length > 16 * 1024 * 1024:
        raise WireError(f"packet data length {length} is too large")
    return command, arg0, arg1, length


def sync_record(ident: bytes, *values: int, payload: bytes = b"") -> bytes:
    """``ident`` + uint32 values + payload (e.g. ``sync_record(b"DATA", len(b), payload=b)``)."""
    return ident + struct.pack(f"<{len(values)}I", *values) + payload


def sync_fail(message: str) -> bytes:
    raw = message.encode()
    return sync_record(b"FAIL", len(raw), payload=raw)
