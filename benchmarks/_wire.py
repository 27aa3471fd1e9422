"""A byte-counting TCP proxy: one listening port per device in front of the real server,
so every byte a device sends and receives (HTTP headers and bodies) is measured on the
wire, per device."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any


class WireMeter:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.counts: dict[str, dict[str, int]] = defaultdict(
            lambda: {"up": 0, "down": 0, "connections": 0}
        )
        self.ports: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="wire-meter", daemon=True
        )
        self._servers: list[Any] = []
        self._thread.start()

    def url(self, name: str) -> str:
        """http://127.0.0.1:PORT for device `name` (a new port on first use)."""
        if name not in self.ports:
            fut = asyncio.run_coroutine_threadsafe(self._listen(name), self._loop)
            self.ports[name] = fut.result(10)
        return f"http://127.0.0.1:{self.ports[name]}"

    async def _listen(self, name: str) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.counts[name]["connections"] += 1
            try:
                r2, w2 = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                self._pump(reader, w2, name, "up"), self._pump(r2, writer, name, "down")
            )

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str, way: str
    ) -> None:
        try:
            while data := await reader.read(65536):
                self.counts[name][way] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - closing a dead socket
                pass

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.counts.items()}

    def close(self) -> None:
        for s in self._servers:
            self._loop.call_soon_threadsafe(s.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
