"""The update download against a server that plays HTTP Range games (RFC 9110 section 14): a 206 answer is used
for what its Content-Range says it holds, never simply appended, so a resumed file is the target or nothing."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.updates.fetch import DownloadFailed, HttpFetcher

pytestmark = pytest.mark.integration

DATA = os.urandom(200_000)
CUT = 70_000


class Scripted:
    """A server on 127.0.0.1 answering request i with ``script[i](range_header)``: (status, headers, body, close)."""

    def __init__(self, script: list[Any]):
        self.script = script
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionError:  # the client dropped a connection it would not use: its right
                    return

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                rng = self.headers.get("Range")
                outer.ranges.append(rng)
                step = outer.script[min(len(outer.ranges), len(outer.script)) - 1]
                status, headers, body, drop_after = step(rng)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                if drop_after is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body[:drop_after] if drop_after is not None else body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/target.bundle"


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Scripted] = []

    def start(script: list[Any]) -> Scripted:
        s = Scripted(script)
        s.thread.start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def whole(rng: str | None) -> tuple[int, dict[str, str], bytes, int | None]:
    return 200, {}, DATA, None


def broken(rng: str | None) -> tuple[int, dict[str, str], bytes, int | None]:
    return 200, {}, DATA, CUT  # the connection breaks after CUT bytes


def honest_range(rng: str | None) -> tuple[int, dict[str, str], bytes, int | None]:
    if rng is None:
        return whole(rng)
    start = int(rng[6:-1])
    return 206, {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"}, DATA[start:], None


def from_offset(start: int, total: int = len(DATA)) -> Any:
    """A 206 that holds another range than the one asked for (RFC 9110 lets a server send more), labelled."""

    def step(rng: str | None) -> tuple[int, dict[str, str], bytes, int | None]:
        return 206, {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{total}"}, DATA[start:], None

    return step


@pytest.mark.parametrize(
    "second",
    [
        from_offset(0),  # the whole file as a 206
        from_offset(CUT - 4096),  # a block-aligned superset of the range asked for
        from_offset(CUT + 4096),  # a later range: a gap would be left
        from_offset(CUT, total=len(DATA) + 1),  # another object (e.g. a stale cached copy)
        lambda rng: (206, {}, DATA[CUT:], None),  # a 206 without Content-Range
    ],
    ids=["from_zero", "earlier_start", "later_start", "other_length", "no_content_range"],
)
def test_a_resumed_download_uses_a_206_only_for_the_bytes_it_says_it_holds(
    serve: Any, tmp_path: Path, second: Any
) -> None:
    server = serve([broken, second, honest_range, whole])
    part = tmp_path / "t.part"
    got = HttpFetcher(timeout_s=30).download_resumable(server.url, part, len(DATA), attempts=5, backoff_s=0.01)
    assert got.read_bytes() == DATA
    assert server.ranges[0] is None and server.ranges[1] == f"bytes={CUT}-"


def test_a_server_that_only_plays_range_games_ends_in_a_clear_failure(serve: Any, tmp_path: Path) -> None:
    server = serve([broken, from_offset(CUT + 10)])
    part = tmp_path / "t.part"
    with pytest.raises(DownloadFailed) as err:
        HttpFetcher(timeout_s=30).download_resumable(server.url, part, len(DATA), attempts=3, backoff_s=0.01)
    assert err.value.reason == "connection" and "Content-Range" in str(err.value)
    assert not part.exists() or part.read_bytes() == DATA[: part.stat().st_size]  # never a wrong byte on disk
