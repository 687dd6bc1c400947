"""A small HTTP/1.1 client for the gateway's hot path to an upstream: keep-alive connections on asyncio streams.

httpx costs about 0.7 ms of CPU per request (measured on the benchmark machine, against 0.05 ms for the same
exchange on raw asyncio streams), which was most of the latency the gateway added in front of an upstream
(``benchmarks/gateway_overhead.py``). This client does only what forwarding a JSON POST needs: one write per
request (head and body together), ``Content-Length``, chunked and read-to-close bodies, line iteration for
server-sent events, a pool of idle keep-alive connections, TLS for ``https://``, connect and read timeouts.

Errors: :class:`ConnectFailed` (nothing was sent, safe to retry), :class:`ReadTimeout`, :class:`ProtocolFailure`
(the connection broke or the answer was not HTTP). A reused idle connection that the server had closed is
retried once on a fresh one before anything is reported.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

MAX_HEAD_BYTES = 64 * 1024
TIMEOUT_CM = getattr(asyncio, "timeout", None)


class UpstreamHTTPError(Exception):
    """Base of this client's errors."""


class ConnectFailed(UpstreamHTTPError):
    """The connection could not be made; the request was not sent."""


class ReadTimeout(UpstreamHTTPError):
    """The upstream did not answer (or send the next part of its answer) in time."""


class ProtocolFailure(UpstreamHTTPError):
    """The connection broke off, or what came back is not HTTP/1.1."""


class StaleConnection(ProtocolFailure):
    """A reused keep-alive connection was closed by the server before it answered (retried once internally)."""


def fast_path_usable(base_url: str) -> bool:
    """True when no proxy from the environment applies to ``base_url`` (httpx would use one; this client does not)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    proxies = getproxies()
    return not (proxies.get(parts.scheme) or proxies.get("all")) or bool(proxy_bypass(parts.hostname))


async def within(awaitable, seconds: float):
    """``awaitable`` with a deadline; :class:`ReadTimeout` when it passes. ``asyncio.timeout`` (3.11+) arms a
    timer on the running task; ``wait_for`` (3.10) wraps the read in a task of its own, ~20 us more per read."""
    try:
        if TIMEOUT_CM is None:
            return await asyncio.wait_for(awaitable, seconds)
        async with TIMEOUT_CM(seconds):
            return await awaitable
    except asyncio.TimeoutError:
        raise ReadTimeout(f"no answer within {seconds:g} s") from None


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.reused = False

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class Response:
    """Status and headers of an answer; the body is read with :meth:`read`, :meth:`iter_lines` or drained by
    :meth:`aclose`. The connection goes back to the pool once the body was read to its end."""

    def __init__(self, pool: Pool, conn: Connection, status: int, headers: dict[str, str], read_timeout_s: float):
        self.pool, self.conn, self.status_code, self.headers = pool, conn, status, headers
        self.read_timeout_s = read_timeout_s
        self.done = False
        te = headers.get("transfer-encoding", "").lower()
        self.chunked = "chunked" in te
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None and length.isdigit() and not self.chunked else None
        if status in (204, 304):  # no body, whatever the headers say
            self.chunked, self.remaining = False, 0
        connection = headers.get("connection", "").lower()
        persistent = connection == "keep-alive" if headers.get(":version") == "HTTP/1.0" else connection != "close"
        self.keep_alive = persistent and (self.chunked or self.remaining is not None)

    async def _read_chunk(self) -> bytes:
        """The next piece of the body; b"" at its end (and the connection released)."""
        if self.done:
            return b""
        r = self.conn.reader
        try:
            if self.chunked:  # one deadline for the whole chunk: a timer per read was a tenth of a stream's CPU
                return await within(self._next_chunk(r), self.read_timeout_s)
            if self.remaining is not None:
                if self.remaining == 0:
                    self._finish()
                    return b""
                data = await within(r.read(min(self.remaining, 65536)), self.read_timeout_s)
                if not data:
                    raise ProtocolFailure("the upstream closed the connection in the middle of the body")
                self.remaining -= len(data)
                return data
            data = await within(r.read(65536), self.read_timeout_s)  # no framing: the body ends at close
            if not data:
                self._finish()
            return data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError) as exc:
            self._abandon()
            raise ProtocolFailure(f"the upstream connection broke off ({type(exc).__name__})") from None
        except ReadTimeout:
            self._abandon()
            raise

    async def _next_chunk(self, r: asyncio.StreamReader) -> bytes:
        size = int((await r.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            while (await r.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            self._finish()
            return b""
        return (await r.readexactly(size + 2))[:-2]

    def _finish(self) -> None:
        self.done = True
        if self.keep_alive:
            self.pool.release(self.conn)
        else:
            self.conn.close()

    def _abandon(self) -> None:
        self.done = True
        self.conn.close()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    aread = read  # the name httpx uses

    async def json(self) -> Any:
        return json.loads(await self.read())

    async def iter_lines(self) -> AsyncIterator[str]:
        """Lines of the body (without their ``\\n`` / ``\\r\\n``), as they arrive."""
        pending = b""
        while chunk := await self._read_chunk():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8")

    aiter_lines = iter_lines  # the name httpx uses

    async def aclose(self, drain_s: float = 0.05) -> None:
        """Release the connection: read what is left of the body briefly (so it can be reused), else close it."""
        if self.done:
            return
        try:
            await asyncio.wait_for(self.read(), drain_s)
        except (asyncio.TimeoutError, UpstreamHTTPError):
            self._abandon()


class Pool:
    """Keep-alive connections to one upstream (``scheme://host:port``)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        max_connections: int = 512,
        max_idle: int = 128,
    ):
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self.max_idle = max_idle
        self.idle: deque[Connection] = deque()
        self.slots = asyncio.Semaphore(max_connections)
        self.ssl_context = ssl.create_default_context() if self.tls else None

    async def connect(self) -> Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    limit=MAX_HEAD_BYTES * 4,
                    server_hostname=self.host if self.tls else None,
                ),
                self.connect_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connect timed out after {self.connect_timeout_s:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConnectFailed(f"{type(exc).__name__}: {why}") from None
        return Connection(reader, writer)

    async def checkout(self) -> Connection:
        while self.idle:
            conn = self.idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.close()
        return await self.connect()

    def release(self, conn: Connection) -> None:
        if len(self.idle) < self.max_idle and conn.usable():
            self.idle.append(conn)
        else:
            conn.close()

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and read its status and headers (the body is left to the :class:`Response`)."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1", f"host: {self.host_header}", "accept: */*"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            head += ["content-type: application/json", f"content-length: {len(body)}"]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
        async with self.slots:
            conn = await self.checkout()
            try:
                return await self.exchange(conn, data)
            except StaleConnection:
                return await self.exchange(await self.connect(), data)

    async def exchange(self, conn: Connection, data: bytes) -> Response:
        try:
            conn.writer.write(data)
            await conn.writer.drain()
            raw = await within(conn.reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
        except ReadTimeout:
            conn.close()
            raise
        except asyncio.IncompleteReadError as exc:
            conn.close()
            if conn.reused and not exc.partial:
                raise StaleConnection("the server had closed the idle connection") from None
            raise ProtocolFailure("the upstream closed the connection before answering") from None
        except (asyncio.LimitOverrunError, ConnectionError, OSError) as exc:
            conn.close()
            if conn.reused and isinstance(exc, ConnectionError):
                raise StaleConnection("the server had closed the idle connection") from None
            raise ProtocolFailure(f"the upstream connection failed ({type(exc).__name__})") from None
        status, headers = parse_head(raw)
        if status is None:
            conn.close()
            raise ProtocolFailure("the upstream's answer is not HTTP/1.x")
        return Response(self, conn, status, headers, self.read_timeout_s)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def parse_head(raw: bytes) -> tuple[int | None, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None, {}
    headers: dict[str, str] = {":version": parts[0]}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers
