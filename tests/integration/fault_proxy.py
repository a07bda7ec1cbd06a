"""A TCP proxy on loopback that a test can cut, to make a real dependency disappear.

The process under test connects to PostgreSQL or Redis through the proxy; `cut()` resets
every connection and refuses new ones (what a crashed or restarting server looks like from
the client), `restore()` lets connections through again on the same port. `blackhole()` is
the silent kind of failure (a NAT that forgot the mapping, a peer that hangs): connections
stay open, new ones are accepted, and nothing gets through either way until `restore()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from bench.ports import free_port


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self.blackholed = False

    async def __aenter__(self) -> FaultProxy:
        await self.restore()
        return self

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        await self.cut()

    @property
    def up(self) -> bool:
        return self._server is not None

    def blackhole(self) -> None:
        """Swallow every byte from now on, both ways, on open and new connections."""
        self.blackholed = True

    async def restore(self) -> None:
        self.blackholed = False
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones (RST, not a polite FIN)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blackholed:  # accepted, then never answered
            self._writers.add(writer)
            with contextlib.suppress(OSError):
                while await reader.read(65536):
                    pass
            self._writers.discard(writer)
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            self._writers -= {writer, up_writer}
            for w in (writer, up_writer):
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.blackholed:
                    continue
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
