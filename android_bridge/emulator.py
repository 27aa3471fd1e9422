"""An emulated Android device: the device side of the adb transport on loopback TCP.

The real ``adb connect 127.0.0.1:PORT`` attaches to it; ``adb shell/push/pull`` and this
package's bridge then work unchanged. It is a test double for a phone *at the wire level
only*: the CNXN handshake (no AUTH, no features, so the host uses legacy ``shell:`` and
sync v1), OPEN/OKAY/WRTE/CLSE streams with one-OKAY-per-WRTE flow control, a shell that runs
host commands inside a sandbox folder (see ``fake_device``), and sync STAT/LIST/SEND/RECV.
It runs host builds of programs, not Android ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmobillm.android_bridge import adb_wire as w
from fedmobillm.android_bridge.fake_device import (
    FakeProfile,
    build_fake_fs,
    map_command,
    map_path,
    shell_env,
    used_kb,
)

log = logging.getLogger(__name__)


@dataclass
class EmulatorConfig:
    root: Path
    host: str = "127.0.0.1"
    port: int = 5555
    profile: FakeProfile = field(default_factory=FakeProfile)
    unauthorized: bool = False  # answer CNXN with AUTH and never accept: adb shows "unauthorized"


class Stream:
    """One adb stream (local id <-> the host's remote id) with flow control."""

    def __init__(self, conn: Connection, local_id: int, remote_id: int) -> None:
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._acked = asyncio.Event()
        self._acked.set()
        self.closed = False

    async def write(self, data: bytes) -> None:
        step = self.conn.max_payload
        for start in range(0, len(data), step):
            await self._acked.wait()
            if self.closed:
                raise ConnectionResetError("stream closed by host")
            self._acked.clear()
            self.conn.send(w.A_WRTE, self.local_id, self.remote_id, data[start : start + step])

    def acked(self) -> None:
        self._acked.set()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.send(w.A_CLSE, self.local_id, self.remote_id)
        self._acked.set()
        self.conn.streams.pop(self.local_id, None)

    def host_closed(self) -> None:
        self.closed = True
        self._acked.set()
        self.inbox.put_nowait(None)


class Connection:
    """One transport connection from the adb server."""

    def __init__(self, cfg: EmulatorConfig, writer: asyncio.StreamWriter) -> None:
        self.cfg = cfg
        self.writer = writer
        self.streams: dict[int, Stream] = {}
        self.ids = itertools.count(1)
        self.max_payload = w.MAX_PAYLOAD
        self.tasks: set[asyncio.Task] = set()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        self.writer.write(w.encode_packet(command, arg0, arg1, data))

    async def handle(self, pkt: w.Packet) -> None:
        if pkt.command == w.A_CNXN:
            self.max_payload = max(4096, min(w.MAX_PAYLOAD, pkt.arg1 or w.MAX_PAYLOAD))
            if self.cfg.unauthorized:
                self.send(w.A_AUTH, w.AUTH_TOKEN, 0, os.urandom(20))
            else:
                self.send(w.A_CNXN, w.VERSION, w.MAX_PAYLOAD, self.cfg.profile.banner())
        elif pkt.command == w.A_AUTH:
            if pkt.arg0 == w.AUTH_SIGNATURE:  # never accepted: ask again, host offers its key
                self.send(w.A_AUTH, w.AUTH_TOKEN, 0, os.urandom(20))
            # AUTH_RSAPUBLICKEY: a phone would show the "Allow USB debugging?" prompt; no answer.
        elif pkt.command == w.A_OPEN:
            self._open(pkt)
        elif pkt.command == w.A_OKAY:
            s = self.streams.get(pkt.arg1)
            if s:
                s.acked()
        elif pkt.command == w.A_WRTE:
            s = self.streams.get(pkt.arg1)
            if s:
                self.send(w.A_OKAY, s.local_id, s.remote_id)
                s.inbox.put_nowait(pkt.data)
        elif pkt.command == w.A_CLSE:
            s = self.streams.pop(pkt.arg1, None)
            if s:
                s.host_closed()

    def _open(self, pkt: w.Packet) -> None:
        service = pkt.data.rstrip(b"\0").decode(errors="replace")
        handler: Callable[[Stream, str], Awaitable[None]] | None = None
        if service.startswith("shell:") and service != "shell:":
            handler = _shell_service
        elif service == "sync:":
            handler = _sync_service
        if handler is None or self.cfg.unauthorized:
            log.info("refusing service %r", service)
            self.send(w.A_CLSE, 0, pkt.arg0)
            return
        s = Stream(self, next(self.ids), pkt.arg0)
        self.streams[s.local_id] = s
        self.send(w.A_OKAY, s.local_id, s.remote_id)
        task = asyncio.ensure_future(_run_service(handler, s, service))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def cancel_all(self) -> None:
        for task in list(self.tasks):
            task.cancel()


async def _run_service(handler, stream: Stream, service: str) -> None:
    try:
        await handler(stream, service)
    except (ConnectionResetError, BrokenPipeError):
        pass
    except Exception:  # a bug in a service must not take the device down
        log.exception("service %r failed", service)
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


# ---- shell -------------------------------------------------------------------------------


async def _shell_service(stream: Stream, service: str) -> None:
    root = stream.conn.cfg.root
    command = map_command(service[len("shell:") :], root)
    log.debug("shell: %s", command)
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        cwd=root,
        env=shell_env(root),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        host_root = str(root).encode()
        while chunk := await proc.stdout.read(stream.conn.max_payload):
            await stream.write(chunk.replace(host_root, b""))  # show device paths
        await proc.wait()
    finally:
        if proc.returncode is None:  # host went away (e.g. Ctrl-C): stop the command
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()


# ---- sync --------------------------------------------------------------------------------


class _SyncReader:
    """Sync records can be split across or merged within WRTE packets: buffer them."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            data = await self.stream.inbox.get()
            if data is None:
                return None
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def record(self) -> tuple[bytes, int] | None:
        head = await self.read(8)
        if head is None:
            return None
        return head[:4], struct.unpack("<I", head[4:])[0]


async def _sync_service(stream: Stream, _service: str) -> None:
    reader = _SyncReader(stream)
    root = stream.conn.cfg.root
    while (rec := await reader.record()) is not None:
        ident, length = rec
        if ident == b"QUIT":
            return
        arg = await reader.read(length)
        if arg is None:
            return
        path = arg.decode(errors="replace")
        if ident == b"STAT":
            await stream.write(_stat(map_path(path, root)))
        elif ident == b"LIST":
            await stream.write(_list(map_path(path, root)))
        elif ident == b"RECV":
            await _recv(stream, map_path(path, root))
        elif ident == b"SEND":
            await _send(stream, reader, path, root)
        else:
            await stream.write(w.sync_fail(f"unknown sync command {ident!r}"))
            return


def _stat(path: Path) -> bytes:
    try:
        st = os.stat(path)
    except OSError:
        return w.sync_record(b"STAT", 0, 0, 0)
    return w.sync_record(b"STAT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime))


def _list(path: Path) -> bytes:
    out = bytearray()
    try:
        names = [".", "..", *sorted(os.listdir(path))]
    except OSError:
        names = []
    for name in names:
        try:
            st = os.lstat(path / name)
        except OSError:
            continue
        raw = name.encode()
        out += w.sync_record(
            b"DENT", st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime), len(raw), payload=raw
        )
    out += w.sync_record(b"DONE", 0, 0, 0, 0)
    return bytes(out)


async def _recv(stream: Stream, path: Path) -> None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        await stream.write(w.sync_fail(f"open failed: {exc.strerror}"))
        return
    with f:
        while chunk := f.read(w.SYNC_DATA_MAX):
            await stream.write(w.sync_record(b"DATA", len(chunk), payload=chunk))
    await stream.write(w.sync_record(b"DONE", 0))


async def _send(stream: Stream, reader: _SyncReader, spec: str, root: Path) -> None:
    """SEND path,mode then DATA... DONE(mtime). Partial files never stay behind."""
    device_path, _, mode_s = spec.rpartition(",")
    if not device_path:
        device_path, mode_s = spec, "33188"
    target = map_path(device_path, root)
    mode = stat.S_IMODE(int(mode_s)) if mode_s.isdigit() else 0o644
    free_kb = stream.conn.cfg.profile.storage_mb * 1024 - used_kb(root)
    error: str | None = None
    tmp = target.with_name(f".{target.name}.part")
    f = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "wb")  # noqa: SIM115 - closed below
    except OSError as exc:
        error = f"couldn't create file: {exc.strerror}"
    written = 0
    while True:
        rec = await reader.record()
        if rec is None:
            break
        ident, length = rec
        if ident == b"DATA":
            chunk = await reader.read(length)
            if chunk is None:
                break
            written += len(chunk)
            if error is None and written // 1024 > free_kb:
                error = "No space left on device"
            if error is None and f is not None:
                f.write(chunk)
        elif ident == b"DONE":
            break
        else:
            error = error or f"unexpected sync record {ident!r} during SEND"
            break
    if f is not None:
        f.close()
    if error is None and rec is not None and rec[0] == b"DONE":
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        os.utime(target, (rec[1], rec[1]))
        await stream.write(w.sync_record(b"OKAY", 0))
        return
    with contextlib.suppress(OSError):
        tmp.unlink()
    await stream.write(w.sync_fail(error or "transfer interrupted"))


# ---- server ------------------------------------------------------------------------------


async def _serve_connection(
    cfg: EmulatorConfig, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conn = Connection(cfg, writer)
    peer = writer.get_extra_info("peername")
    log.info("adb host connected from %s", peer)
    try:
        while True:
            head = await reader.readexactly(w.HEADER.size)
            command, arg0, arg1, length = w.decode_header(head)
            data = await reader.readexactly(length) if length else b""
            await conn.handle(w.Packet(command, arg0, arg1, data))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, w.WireError) as exc:
        log.info("adb host %s disconnected (%s)", peer, type(exc).__name__)
    finally:
        conn.cancel_all()
        writer.close()


async def serve(cfg: EmulatorConfig, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    cfg.root = build_fake_fs(cfg.root, cfg.profile)
    server = await asyncio.start_server(
        lambda r, wr: _serve_connection(cfg, r, wr), cfg.host, cfg.port
    )
    cfg.port = server.sockets[0].getsockname()[1]
    log.info(
        "emulated device %s (%s) on %s:%d, sandbox %s",
        cfg.profile.props()["ro.product.model"],
        cfg.profile.abi,
        cfg.host,
        cfg.port,
        cfg.root,
    )
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()
