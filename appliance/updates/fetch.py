"""The box's one HTTP stack for updates: TUF metadata through ``tuf.ngclient`` and targets with resume.

:class:`HttpFetcher` is a ``tuf.ngclient.FetcherInterface`` on urllib3 (the library TUF's own fetcher uses)
with the repository's CA (``updates.ca_file``, for a test CA or a private endpoint) and timeouts; it also
downloads a target into a partial file and resumes it with an HTTP Range request (RFC 9110 section 14) after
an interrupted connection. A download is bounded by the length TUF signed: a server that sends more (an
endless-data attack) is cut off at ``length + 1`` bytes and the partial file is dropped.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from appliance.core.logs import get_logger

log = get_logger(__name__)

_CHUNK = 256 * 1024
Progress = Callable[[int], None]  # bytes of the target on disk so far; may raise to cancel


class DownloadFailed(Exception):
    """A target could not be downloaded after every attempt (``reason``: a stable code, e.g. ``http_404``,
    ``too_long``, ``connection``)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{message} [{reason}]")


class HttpFetcher(FetcherInterface):
    """urllib3 fetcher: TLS verified against ``ca_file`` (None = the system store), ``timeout_s`` for the
    connection and between bytes, no automatic retries (the caller decides)."""

    def __init__(self, ca_file: str | None = None, timeout_s: float = 30.0, user_agent: str = "appliance-updates"):
        self.timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)
        self.pool = urllib3.PoolManager(ca_certs=ca_file, cert_reqs="CERT_REQUIRED", retries=False)
        self.headers = {"User-Agent": user_agent}

    def _get(self, url: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        try:
            return self.pool.request(
                "GET", url, headers={**self.headers, **(headers or {})}, preload_content=False, timeout=self.timeout
            )
        except urllib3.exceptions.TimeoutError as exc:
            raise exceptions.SlowRetrievalError(f"no answer from {url}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        """TUF's hook: the body of ``url`` in chunks; DownloadHTTPError on an HTTP error status."""
        resp = self._get(url)
        if resp.status >= 400:
            resp.release_conn()
            raise exceptions.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from resp.stream(_CHUNK)
        except urllib3.exceptions.TimeoutError as exc:
            raise exceptions.SlowRetrievalError("the repository stopped sending") from exc
        finally:
            resp.release_conn()

    def download_resumable(
        self,
        url: str,
        part: Path,
        length: int,
        *,
        attempts: int = 5,
        backoff_s: float = 1.0,
        progress: Progress | None = None,
    ) -> Path:
        """Download ``url`` into ``part`` until it holds exactly ``length`` bytes, resuming what is already
        there with ``Range: bytes=<have>-`` (a server that ignores Range and answers 200 restarts the file; a 206 is
        used only for the bytes its ``Content-Range`` says it holds: an earlier start is skipped up to ``have``, a
        later start, a missing range or a range of an object of another length is a failed attempt).

        Each connection that breaks, times out or ends early costs one of ``attempts`` (backoff doubling from
        ``backoff_s``); ``progress(bytes_on_disk)`` is called as data arrives. Raises :class:`DownloadFailed`
        (``too_long`` when the server sends more than ``length``: the partial file is deleted; ``http_<status>``
        for an HTTP error other than 416; ``connection`` when the attempts are used up).
        """
        part.parent.mkdir(parents=True, exist_ok=True)
        failures = 0
        last = ""
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > length:
                part.unlink()
                raise DownloadFailed("too_long", f"{have} bytes on disk but the signed length is {length}")
            if have == length:
                return part
            if progress is not None:
                progress(have)
            try:
                self._one_pass(url, part, have, length, progress)
                if part.exists() and part.stat().st_size >= length:
                    continue  # complete (or too long): the checks above decide
                last = "the connection ended before the signed length"
            except DownloadFailed:
                raise
            except (urllib3.exceptions.HTTPError, exceptions.SlowRetrievalError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"[:300]
            failures += 1
            got = part.stat().st_size if part.exists() else 0
            log.warning("download interrupted", url=url, bytes=got, total=length, attempt=failures, error=last)
            if failures >= attempts:
                raise DownloadFailed("connection", f"gave up after {failures} attempts ({last})")
            time.sleep(min(60.0, backoff_s * 2 ** (failures - 1)))

    def _one_pass(self, url: str, part: Path, have: int, length: int, progress: Progress | None) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self._get(url, headers)
        try:
            if resp.status == 416:  # nothing at or after `have`: our partial file is not a prefix of the target
                part.unlink(missing_ok=True)
                raise urllib3.exceptions.HTTPError("range not satisfiable; starting over")
            if resp.status >= 400:
                raise DownloadFailed(f"http_{resp.status}", f"HTTP {resp.status} for {url}")
            if resp.status not in (200, 206):  # e.g. a redirect (not followed) or 204: no bytes of the target
                raise urllib3.exceptions.HTTPError(f"HTTP {resp.status} is not the target's content")
            skip = 0
            if resp.status == 206:
                start = _range_start(resp.headers.get("Content-Range"), length, part)
                if start > have:
                    raise urllib3.exceptions.HTTPError(
                        f"206 Content-Range starts at byte {start}, after the {have} bytes on disk"
                    )
                skip = have - start  # RFC 9110 lets a server send more than asked: drop what is already here
            else:
                have = 0  # a 200 is the whole file: start it again
            mode = "ab" if have else "wb"
            done = have
            with open(part, mode) as fh:
                try:
                    # read1: whatever arrived (one socket read), so the bytes before a broken connection are kept
                    while chunk := resp.read1(_CHUNK):
                        if skip:
                            dropped = min(skip, len(chunk))
                            chunk, skip = chunk[dropped:], skip - dropped
                            if not chunk:
                                continue
                        done += len(chunk)
                        if done > length:
                            fh.close()
                            part.unlink(missing_ok=True)
                            raise DownloadFailed(
                                "too_long", f"the server sent more than the {length} bytes TUF signed for this target"
                            )
                        fh.write(chunk)
                        fh.flush()  # in the OS before it is reported: a killed process keeps what it reported
                        if progress is not None:
                            progress(done)
                finally:
                    if not fh.closed:
                        fh.flush()
                        os.fsync(fh.fileno())
        finally:
            resp.release_conn()


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)\Z")


def _range_start(header: str | None, length: int, part: Path) -> int:
    """The first byte a 206 answer holds, from its ``Content-Range`` (RFC 9110 section 14.4). A 206 without a
    single byte range (missing, malformed, multipart) is not used (urllib3 HTTPError: one failed attempt); one
    for a representation of another length is another object than the signed target: the partial file is
    dropped too (starting over)."""
    m = _CONTENT_RANGE.match((header or "").strip())
    if m is None:
        raise urllib3.exceptions.HTTPError(f"206 without a usable Content-Range ({(header or '')[:80]!r})")
    first, last, total = int(m[1]), int(m[2]), m[3]
    if total != "*" and int(total) != length:
        part.unlink(missing_ok=True)
        raise urllib3.exceptions.HTTPError(
            f"206 Content-Range is of a {total}-byte object, not the {length} bytes signed; starting over"
        )
    if last < first:
        raise urllib3.exceptions.HTTPError(f"206 with an empty Content-Range ({header!r})")
    return first
