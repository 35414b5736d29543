"""A fault-injecting HTTP reverse proxy in front of an S3 endpoint (stdlib only), for chaos tests.

Point ``AWS_ENDPOINT_URL`` at :attr:`FaultyProxy.url`. Each request, with probability ``rate``, gets
one fault instead of reaching the upstream service: an S3 ``InternalError`` (500) or ``SlowDown``
(503) XML error that SDKs classify as retryable, a connection reset (RST), or a hang of ``hold_s``
seconds then a close without a response (a client whose read timeout is shorter sees a timeout).
Faults are injected before a request is forwarded, so a faulted request never changes the store:
whatever a retrying client ends up with must equal a run without faults. ``rate=1.0`` fails every
request (a write that cannot complete); ``rate`` may be changed while the proxy runs.

Requests that are not faulted are forwarded after ``latency_s``, their bodies streamed as they come
(Content-Length or chunked, such as botocore's aws-chunked uploads; HEAD; range GETs), with the
client's Host header, which SigV4 signs, unchanged. ``faults_injected`` and ``ops_completed``
(requests forwarded whose response reached the client) are what ``bench chaos`` reports.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import multiprocessing
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized, SynchronizedArray
from socketserver import TCPServer
from types import TracebackType
from urllib.parse import urlparse

log = logging.getLogger(__name__)

KINDS = ("500", "503", "reset", "timeout")
ERRORS = {"500": (500, "InternalError", "We encountered an internal error. Please try again."),
          "503": (503, "SlowDown", "Please reduce your request rate.")}
# not forwarded: they describe one hop (Transfer-Encoding is kept: chunked bodies go through framed as they came)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
                        "upgrade", "expect"})
BUF = 1 << 16


class FaultyProxy:
    """A reverse proxy on 127.0.0.1 (a free port) that fails a fraction ``rate`` of requests.

    It serves from a child process: TileDB's S3 client holds the GIL while it waits for a response,
    so a proxy thread in the process that uses TileDB would never answer. ``kinds`` are drawn
    uniformly among the faulted requests, from a generator seeded with ``seed`` (the order of
    concurrent requests still varies). ``methods`` limits faults to requests with these HTTP
    methods, e.g. the writes (PUT, POST, DELETE) so that a store can be read but not changed. The
    counters live in shared memory: exact under concurrency, readable while the proxy runs and after
    it stops."""

    def __init__(self, upstream_url: str, *, rate: float, seed: int = 0, latency_s: float = 0.0,
                 kinds: Iterable[str] = KINDS, hold_s: float = 2.0, methods: Iterable[str] | None = None) -> None:
        parsed = urlparse(upstream_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"upstream must be an http(s)://host[:port] URL, got {upstream_url!r}")
        self.kinds = tuple(kinds)
        if not self.kinds or not set(self.kinds) <= set(KINDS):
            raise ValueError(f"kinds must be some of {KINDS}, got {self.kinds}")
        if latency_s < 0 or hold_s < 0:
            raise ValueError("latency_s and hold_s must be >= 0")
        self.methods = None if methods is None else frozenset(m.upper() for m in methods)
        self._settings = _Settings(parsed.scheme, parsed.hostname, parsed.port, seed, latency_s, self.kinds, hold_s,
                                   self.methods)
        self._mp = multiprocessing.get_context("spawn")  # not fork: the parent may run threads (Ray, TileDB)
        self._rate = self._mp.Value("d", 0.0)
        self.rate = rate
        self._counts = self._mp.Array("q", 2 + len(KINDS))  # faults, ops, then faults per kind in KINDS
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._port: int | None = None

    @property
    def rate(self) -> float:
        return self._rate.value

    @rate.setter
    def rate(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {value}")
        self._rate.value = value

    @property
    def faults_injected(self) -> int:
        return self._counts[0]

    @property
    def ops_completed(self) -> int:
        """Requests forwarded whose whole response reached the client."""
        return self._counts[1]

    @property
    def faults_by_kind(self) -> dict[str, int]:
        with self._counts.get_lock():
            return {k: self._counts[2 + i] for i, k in enumerate(KINDS) if k in self.kinds}

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the proxy is not running")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FaultyProxy:
        receive, send = self._mp.Pipe(duplex=False)
        self._proc = self._mp.Process(target=_serve, args=(self._settings, self._rate, self._counts, send),
                                      name="s3-fault-proxy", daemon=True)
        self._proc.start()
        send.close()
        try:
            port = receive.recv() if receive.poll(60) else None
        except EOFError:  # the child died first
            port = None
        if port is None:
            self.stop()
            raise RuntimeError("the fault proxy did not start (a script that starts one needs "
                               "an `if __name__ == '__main__':` guard: its child process imports the script)")
        self._port = port
        return self

    def stop(self) -> None:
        """End the proxy and every connection through it (held 'timeout' faults included)."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._proc = self._port = None

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class _Settings:
    scheme: str
    host: str
    port: int | None
    seed: int
    latency_s: float
    kinds: tuple[str, ...]
    hold_s: float
    methods: frozenset[str] | None


class _Faults:
    """The child process's side: draws faults, counts, opens upstream connections."""

    def __init__(self, settings: _Settings, rate: Synchronized, counts: SynchronizedArray) -> None:
        self.settings, self.rate, self.counts = settings, rate, counts
        self.rng = random.Random(settings.seed)

    def draw(self, method: str) -> str | None:
        """The fault for the next request, or None to forward it (counted here)."""
        if self.settings.methods is not None and method not in self.settings.methods:
            return None
        with self.counts.get_lock():
            if self.rng.random() >= self.rate.value:
                return None
            kind = self.rng.choice(self.settings.kinds)
            self.counts[0] += 1
            self.counts[2 + KINDS.index(kind)] += 1
            return kind

    def completed(self) -> None:
        with self.counts.get_lock():
            self.counts[1] += 1

    def connect_upstream(self) -> http.client.HTTPConnection:
        s = self.settings
        cls = http.client.HTTPSConnection if s.scheme == "https" else http.client.HTTPConnection
        return cls(s.host, s.port, timeout=300)


def _serve(settings: _Settings, rate: Synchronized, counts: SynchronizedArray, ready: Connection) -> None:
    server = _Server(_Faults(settings, rate, counts))
    ready.send(server.server_address[1])
    ready.close()
    server.serve_forever()


class _Server(ThreadingHTTPServer):
    def __init__(self, faults: _Faults) -> None:
        self.faults = faults
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        TCPServer.server_bind(self)  # HTTPServer's looks up the host's FQDN: slow where DNS is not reachable
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        log.debug("proxy connection from %s failed", client_address, exc_info=True)  # not a traceback on stderr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked bodies, Expect: 100-continue
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no delayed-ACK stalls
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _handle(self) -> None:
        faults = self.server.faults
        fault = faults.draw(self.command)
        if fault == "reset":
            # RST, not FIN: linger 0, closed here before the server's own shutdown(SHUT_WR) could send a FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        try:
            if fault is not None:
                for _ in self._request_body():  # the whole request arrives, then no answer or an error
                    pass
                if fault == "timeout":
                    time.sleep(faults.settings.hold_s)
                    self.close_connection = True
                else:
                    self._send_error(*ERRORS[fault])
                return
            time.sleep(faults.settings.latency_s)
            self._forward(faults)
        except (OSError, http.client.HTTPException) as exc:  # a client or the upstream went away: drop this one
            log.debug("%s %s: %s", self.command, self.path, exc)
            self.close_connection = True
            return
        faults.completed()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_OPTIONS = do_PATCH = _handle

    def _request_body(self) -> Iterator[bytes]:
        """The request's body as raw bytes on the wire (chunk framing kept), read as it comes."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._raw_chunks()
            return
        yield from self._exactly(int(self.headers.get("Content-Length") or 0), "mid-body")

    def _exactly(self, n: int, where: str) -> Iterator[bytes]:
        """``n`` bytes of the request, in pieces as they come."""
        while n > 0:
            piece = self.rfile.read(min(n, BUF))
            if not piece:
                raise ConnectionError(f"the client closed the connection {where}")
            n -= len(piece)
            yield piece

    def _raw_chunks(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(BUF)
            if not line.endswith(b"\n"):
                raise ConnectionError("bad chunk size line")
            yield line
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:  # trailers, up to an empty line
                while True:
                    line = self.rfile.readline(BUF)
                    if not line:
                        raise ConnectionError("the client closed the connection in the trailers")
                    yield line
                    if line in (b"\r\n", b"\n"):
                        return
            yield from self._exactly(size + 2, "mid-chunk")  # the data and its CRLF

    def _forward(self, faults: _Faults) -> None:
        # one upstream connection per request: a reused one the upstream has closed would fail after the
        # client's body was consumed, when the request can no longer be replayed
        upstream = faults.connect_upstream()
        try:
            upstream.connect()
            upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.putheader("Connection", "close")
            upstream.endheaders()
            for piece in self._request_body():
                upstream.send(piece)
            resp = upstream.getresponse()
            self._relay(resp)
        finally:
            upstream.close()

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        self.send_response_only(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "transfer-encoding":  # framing is set below
                self.send_header(name, value)
        bodiless = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        length = resp.getheader("Content-Length")
        chunked = not bodiless and length is None and resp.chunked
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not bodiless and length is None:  # delimited by the upstream's close: so is ours
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if bodiless:
            return
        while piece := resp.read(BUF):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        if resp.length:  # http.client ends a short body quietly: close, so that the client sees it too
            raise ConnectionError("the upstream response ended early")

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{self.path.split('?', 1)[0]}</Resource><RequestId>scmm-fault</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A local moto S3 server on 127.0.0.1 in its own process (TileDB's S3 client blocks the GIL);
    yields its endpoint URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the moto server on port {port} did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
