"""The console's HTTP server: the page (page/index.html, console.js, console.css), the fleet as JSON
(GET /api/fleet), the charts (GET /api/charts), and live updates as server-sent events (GET /api/events:
an `event: fleet` with the whole snapshot on every change, at most every THROTTLE_S, and at least every
REFRESH_S so ages and staleness move on a quiet fleet).

The standard library's ThreadingHTTPServer, not a web framework: the console serves a few operators'
browsers a read-only page and JSON, and one thread per open event stream (capped at MAX_STREAMS) is
cheap at that scale; it adds no dependency to the cloud image and nothing to build. Bound: only GET,
only the routes below, no request body read; responses are no-store and the page may load nothing but
its own files (Content-Security-Policy). A connection that sends nothing is closed after
REQUEST_TIMEOUT_S, and at most MAX_CONNECTIONS are served at once (one thread each): the next ones are
closed unanswered. A request whose Host header names no allowed host (localhost, 127.0.0.1, [::1], the
listening host, console.allowed_hosts) gets 421: a DNS-rebinding page in an operator's browser cannot
read the console through a name of its own."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Protocol

from services.console.errors import PageMissing
from shared.logs import fields

log = logging.getLogger(__name__)

PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/index.html": ("index.html", "text/html; charset=utf-8"),
              "/console.js": ("console.js", "text/javascript; charset=utf-8"),
              "/console.css": ("console.css", "text/css; charset=utf-8")}
THROTTLE_S = 0.5
REFRESH_S = 1.0
MAX_STREAMS = 32
# Open connections served at once, event streams included; each holds a thread.
MAX_CONNECTIONS = 64
# A connection that sends no request (or takes longer over it), or does not take what it is sent, for
# this long is closed: it holds a thread and a connection slot.
REQUEST_TIMEOUT_S = 10.0
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
_HOST_HEADER = re.compile(r"^(\[[0-9a-f:.]+\]|[^:\[\]/@\s]+)(?::[0-9]{1,5})?$")  # host[:port], IPv6 bracketed
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class Source(Protocol):
    """What the server shows: the service's state, as JSON ready to send."""

    def fleet_json(self) -> bytes: ...

    def charts_json(self) -> bytes: ...

    def wait_change(self, seen: int, timeout: float) -> int: ...


def page_files() -> dict[str, bytes]:
    """The page's files, read once at start from the installed package.

    :raises PageMissing: a file is not installed (the package's data left out).
    """
    folder = resources.files("services.console") / "page"
    out = {}
    for name in {name for name, _ in PAGE_FILES.values()}:
        try:
            out[name] = (folder / name).read_bytes()
        except OSError as exc:
            raise PageMissing(f"the console's page file {name} is missing ({exc}): install the package with its "
                              "data (pyproject's package-data)") from None
    return out


class ConsoleServer:
    """The HTTP server, bound at construction (a port in use fails the start), served by serve() on the
    caller's thread until stop().

    :param str host: the address to listen on.
    :param int port: the port; 0: a free one (see `port`).
    :param Source source: what to show.
    :raises OSError: the address cannot be bound.
    :raises PageMissing: the page's files are not installed.
    """

    def __init__(self, host: str, port: int, source: Source, allowed_hosts: Iterable[str] = ()) -> None:
        self.source = source
        self.files = page_files()
        self.stopping = threading.Event()
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.allowed_hosts = LOOPBACK_HOSTS | {host.lower()} | {h.lower() for h in allowed_hosts}
        self.httpd = _BoundedHTTPServer((host, port), _handler(self), MAX_CONNECTIONS)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.httpd.server_address[0])
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104  # what a browser can open
        return f"http://{shown}:{self.port}/"

    def serve(self) -> None:
        """Serves until stop(); returns then."""
        self.httpd.serve_forever(poll_interval=0.25)

    def stop(self) -> None:
        """Ends the event streams (each within REFRESH_S), stops serve() and closes the socket."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most `limit` connections served at once; one more is closed at once."""

    daemon_threads = True  # an open event stream must not hold the process at exit
    # The listen backlog: socketserver's 5 would leave connections beyond it waiting in the kernel (their
    # client sees them open) until the loop takes the ones before; a burst up to the cap is taken at once.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limit: int) -> None:
        self.slots = threading.BoundedSemaphore(limit)
        self.refused = 0  # connections closed unanswered, over the limit
        super().__init__(address, handler)

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: tuple[str, int]) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            log.warning("connection refused: too many open", extra=fields(client=client_address[0],
                                                                           limit=MAX_CONNECTIONS))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()  # no thread started: nothing else will give the slot back
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def host_of(header: str | None) -> str | None:
    """The host of a Host header, without its port, lower case ("[::1]" keeps its brackets).

    :param header: the header's value, or None when the request has none.
    :returns: the host; None if the header is absent or not `host[:port]`.
    """
    found = _HOST_HEADER.match(header.strip().lower()) if header else None
    return found.group(1) if found else None


def _handler(server: ConsoleServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "edgefleet-console"
        sys_version = ""
        timeout = REQUEST_TIMEOUT_S  # socketserver sets it on the connection: reads and writes give up after it

        def do_GET(self) -> None:  # noqa: N802  # the name http.server calls
            if host_of(self.headers.get("Host")) not in server.allowed_hosts:
                self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unknown host\n", "text/plain; charset=utf-8")
                return
            path = self.path.split("?", 1)[0]
            if path in PAGE_FILES:
                name, content_type = PAGE_FILES[path]
                self._send(HTTPStatus.OK, server.files[name], content_type)
            elif path == "/api/fleet":
                self._send(HTTPStatus.OK, server.source.fleet_json(), "application/json")
            elif path == "/api/charts":
                self._send(HTTPStatus.OK, server.source.charts_json(), "application/json")
            elif path == "/api/events":
                self._events()
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self._security_headers()
            self.end_headers()
            self.wfile.write(body)

        def _security_headers(self) -> None:
            for name, value in SECURITY_HEADERS.items():
                self.send_header(name, value)

        def _events(self) -> None:
            if not server.streams.acquire(blocking=False):
                self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"too many open consoles\n", "text/plain; charset=utf-8")
                return
            try:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/event-stream")
                self._security_headers()
                self.end_headers()
                _stream(server, self.wfile.write, self.wfile.flush)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the browser went away
            finally:
                server.streams.release()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002  # http.server's signature
            log.debug("http", extra=fields(client=self.client_address[0], request=(format % args)[:300]))

    return Handler


def _stream(server: ConsoleServer, write: Callable[[bytes], object], flush: Callable[[], None]) -> None:
    """Sends the snapshot now, then on every change (at most every THROTTLE_S) and every REFRESH_S."""
    seen = server.source.wait_change(-1, 0)
    while not server.stopping.is_set():
        write(b"retry: 2000\nevent: fleet\ndata: " + server.source.fleet_json() + b"\n\n")
        flush()
        sent = time.monotonic()
        seen = server.source.wait_change(seen, REFRESH_S)
        if server.stopping.wait(max(0.0, THROTTLE_S - (time.monotonic() - sent))):
            return
