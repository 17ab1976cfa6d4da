"""Where WebDataset shards live: local paths, web servers, object stores and ``pipe:`` commands.

A shard is named by a URL, read front to back as a stream (nothing is copied to local disk):

* a local path (no ``scheme://``): opened directly;
* ``http://`` and ``https://``: a streamed GET with the standard library's ``urllib`` (proxies from
  ``HTTP(S)_PROXY``, certificates from the system). Not webdataset's opener: it runs ``curl``,
  whose ``--retry`` starts a transfer cut off mid-shard again from byte 0 into the same output;
  and not fsspec's HTTP filesystem, which needs aiohttp and reads in range requests;
* ``pipe:<command>``: the standard output of a shell command, started by webdataset's
  ``gopen_pipe``. Only a URL the user wrote as ``pipe:`` ever reaches a shell; shard-list files
  may not name ``pipe:`` shards;
* any other ``scheme://`` (``s3://``, ``gs://``, ``az://``, ``hf://``, ``file://``, ``memory://``,
  ...): fsspec, imported only then (``pip install 'dinov2[remote]'`` plus the filesystem package
  of the protocol, e.g. ``s3fs``). Credentials come from that package's usual sources
  (``AWS_*`` environment variables, ``~/.aws``, instance roles, ...).

:class:`ShardStream` is the file object the tar reader reads. A read that breaks (an OS or HTTP
error, a 5xx answer, or a connection that closes before the size the server announced) reopens the
shard at the byte reached: an HTTP ``Range`` request (when the server ignores it, the bytes already
read are skipped), an fsspec seek, or, for a pipe, the command run again with the bytes already
read skipped. It tries ``retries`` times in a row, waiting ``retry_wait`` seconds before the first
retry and twice as long before each next; the count starts again once data arrives. Then a
:class:`ShardReadError` names the URL and the byte offset. Errors that another attempt cannot cure
(no such shard, HTTP 4xx, permission denied) are not retried.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

import webdataset as wds
from webdataset.gopen import Pipe, gopen_pipe, set_options

from dinov2.data.datasets.base import DatasetFormatError, open_text

logger = logging.getLogger("dinov2")

_CHUNK = 1 << 20
# Answers after which another attempt may succeed: request timeout, too many requests, 5xx.
_RETRIED_HTTP_STATUS = {408, 429}
# OS errors that another attempt cannot cure.
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class ShardReadError(OSError):
    """A shard could not be read to its end: the connection kept failing, the server refused, or a
    ``pipe:`` command failed. The message names the URL and the byte offset reached."""


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path (no ``scheme://`` and not ``pipe:``)."""
    return "://" not in url and not url.startswith("pipe:")


def url_scheme(url: str) -> str:
    """``""`` for a local path, ``"pipe"`` for a command, else the lower-case scheme (``https``, ``s3``)."""
    if url.startswith("pipe:"):
        return "pipe"
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _skip_bytes(raw, count: int) -> None:
    """Read and drop the first ``count`` bytes of a stream that cannot seek (a pipe, a server that
    ignored the ``Range`` header)."""
    left = count
    while left:
        data = raw.read(min(left, _CHUNK))
        if not data:
            raise ConnectionError(f"the stream ended at byte {count - left} while skipping to byte {count}")
        left -= len(data)


# Openers: (url, offset, timeout) -> (source, size or None, bytes to skip): a source that cannot
# start at ``offset`` starts at 0, and the stream drops the first ``offset`` bytes it sends.


def _open_local(url: str, offset: int, timeout: float):
    f = open(url, "rb")
    f.seek(offset)
    return f, os.fstat(f.fileno()).st_size, 0


def _open_http(url: str, offset: int, timeout: float):
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        total = re.fullmatch(r"bytes \*/(\d+)", (exc.headers or {}).get("Content-Range", "").strip())
        if exc.code == 416 and offset and total and int(total.group(1)) == offset:
            exc.close()  # the connection broke after the last byte: nothing is left to read
            return io.BytesIO(b""), offset, 0
        raise
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
        if match is None or int(match.group(1)) != offset:
            response.close()
            raise ConnectionError(
                f"asked for the bytes from {offset} on, the server sent Content-Range {content_range!r}"
            )
        return response, None if match.group(2) == "*" else int(match.group(2)), 0
    length = response.headers.get("Content-Length", "")
    # Without 206 the server ignored the Range header and sends the whole shard.
    return response, int(length) if length.strip().isdigit() else None, offset


def _open_pipe(url: str, offset: int, timeout: float):
    return gopen_pipe(url, "rb"), None, offset  # the user's command, in a shell (that is what pipe: means)


def _open_fsspec(url: str, offset: int, timeout: float):
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            f"WebDataset shard {url}: {url_scheme(url)}:// URLs are read with fsspec: pip install 'dinov2[remote]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:  # fsspec knows the protocol but its package is missing ("Install s3fs ...")
        raise ImportError(
            f"WebDataset shard {url}: {exc} (the filesystem package of {url_scheme(url)}://, e.g. s3fs, gcsfs or adlfs)"
        ) from None
    except ValueError as exc:  # an unknown protocol
        raise DatasetFormatError(f"WebDataset shard {url}: {exc}") from None
    f = fs.open(path, "rb")
    size = getattr(f, "size", None)
    if offset:
        f.seek(offset)
    return f, size if isinstance(size, int) else None, 0


def _opener(url: str) -> Callable:
    scheme = url_scheme(url)
    if scheme == "":
        return _open_local
    if scheme in ("http", "https"):
        return _open_http
    if scheme == "pipe":
        return _open_pipe
    return _open_fsspec


def _retried(exc: BaseException) -> bool:
    """Whether another attempt may succeed after ``exc``."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in _RETRIED_HTTP_STATUS
    if isinstance(exc, (*_PERMANENT_OS_ERRORS, http.client.InvalidURL)):
        return False
    # OSError: connection reset or refused, timeouts, URLError, a pipe command's exit status;
    # HTTPException: IncompleteRead, a broken chunked body, a bad status line.
    return isinstance(exc, (OSError, EOFError, http.client.HTTPException))


def _not_found(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (404, 410)
    return isinstance(exc, FileNotFoundError)


class ShardStream(io.RawIOBase):
    """One shard as a read-only binary file object that reconnects where a broken read stopped.

    ``position`` is the number of bytes delivered so far; ``size`` the shard's length when the
    source announced it (local files, ``Content-Length``, fsspec), else ``None``. A source that
    ends before its announced size broke off; one without a size ends where it ends, and the tar
    reader checks that the archive's end-of-archive block came first.
    """

    def __init__(self, url: str, retries: int = 3, retry_wait: float = 1.0, timeout: float = 60.0):
        super().__init__()
        if retries < 0 or retry_wait < 0 or timeout <= 0:
            raise ValueError(f"invalid retry settings: retries={retries}, retry_wait={retry_wait}, timeout={timeout}")
        self.url = url
        self.retries = int(retries)
        self.retry_wait = float(retry_wait)
        self.timeout = float(timeout)
        self.position = 0
        self.size: int | None = None
        self._open = _opener(url)
        self._raw = None
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._ended:
            return 0
        failures = 0
        while True:
            try:
                if self._raw is None:
                    self._raw, size, skip = self._open(self.url, self.position, self.timeout)
                    self.size = size if size is not None else self.size
                    _skip_bytes(self._raw, skip)
                data = self._raw.read(len(buffer))
                if not data:
                    self._end()
                    return 0
            except Exception as exc:
                self._drop()
                if _not_found(exc):
                    raise DatasetFormatError(f"WebDataset shard not found: {self.url} ({exc})") from None
                if not _retried(exc):
                    if isinstance(exc, (OSError, http.client.HTTPException)):
                        raise ShardReadError(f"WebDataset shard {self.url}: {exc} at byte {self.position}") from exc
                    raise
                failures += 1
                if failures > self.retries:
                    raise ShardReadError(
                        f"WebDataset shard {self.url}: reading failed at byte {self.position}{self._of_size()} "
                        f"after {self.retries} retries ({type(exc).__name__}: {exc}); the spec's retries=N and "
                        "timeout=SECONDS set how often and how long a broken read is retried"
                    ) from exc
                wait = self.retry_wait * 2 ** (failures - 1)
                logger.warning(
                    "WebDataset shard %s: %s: %s at byte %d%s; retry %d of %d in %.1f s",
                    self.url,
                    type(exc).__name__,
                    exc,
                    self.position,
                    self._of_size(),
                    failures,
                    self.retries,
                    wait,
                )
                time.sleep(wait)
                continue
            count = len(data)
            buffer[:count] = data
            self.position += count
            return count

    def _of_size(self) -> str:
        return f" of {self.size}" if self.size is not None else ""

    def _end(self) -> None:
        """The source said end of data: check it against the announced size and close it (a pipe's
        command reports its exit status here)."""
        if self.size is not None and self.position < self.size:
            raise ConnectionError(f"the source ended {self.size - self.position} bytes before its announced size")
        raw, self._raw = self._raw, None
        raw.close()
        self._ended = True

    def _drop(self) -> None:
        """Close the source without judging it (after a failure, or when the reader stops early)."""
        raw, self._raw = self._raw, None
        if raw is None:
            return
        if isinstance(raw, Pipe):
            # An abandoned command may be blocked or die of SIGPIPE: neither is an error here.
            set_options(raw, ignore_errors=True)
            raw.proc.terminate()
        raw.close()

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


def read_bytes(url: str, **stream_options) -> bytes:
    """The whole content of a small file (a shard list, a class list) at a path or URL."""
    with ShardStream(url, **stream_options) as stream:
        return stream.read()


def read_text(location: str, what: str, **stream_options) -> str:
    """A UTF-8 text file at a local path (through :func:`~dinov2.data.datasets.base.open_text`) or a URL."""
    if is_local(location):
        with open_text(location, what) as f:
            return f.read()
    data = read_bytes(location, **stream_options)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{what} {location} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _resolve_entry(entry: str, location: str) -> str:
    """A shard named in the list at ``location``: relative entries are relative to the list's own
    directory (or URL)."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    if is_local(location):
        return os.path.join(os.path.dirname(location), entry)
    if url_scheme(location) in ("http", "https"):
        return urllib.parse.urljoin(location, entry)
    return f"{location.rsplit('/', 1)[0]}/{entry}"


def read_shard_list(location: str, **stream_options) -> list[tuple[str, int | None]]:
    """``(url, sample count or None)`` of every shard a shard-list file names.

    ``.json``: webdataset's shard index (as its ``wids`` module reads), an object whose
    ``shardlist`` holds ``{"url": ..., "nsamples": N}`` entries; the counts let a resumed run skip
    whole shards without reading them. Any other name: a text file with one shard path or URL per
    line (brace patterns allowed; blank lines and ``#`` comments ignored). Relative entries are
    resolved against the list's location. ``pipe:`` entries are refused: only a spec string may
    name a command to run.
    """
    text = read_text(location, "shard list", **stream_options)
    where = f"shard list {location}"
    entries: list[tuple[str, int | None, str]] = []
    if location.endswith(".json"):
        try:
            index = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{where} is not valid JSON ({exc})") from None
        shardlist = index.get("shardlist") if isinstance(index, dict) else None
        if not isinstance(shardlist, list):
            raise DatasetFormatError(f'{where}: expected an object with a "shardlist" list of {{"url", "nsamples"}}')
        for i, item in enumerate(shardlist):
            url = item.get("url") if isinstance(item, dict) else None
            count = item.get("nsamples") if isinstance(item, dict) else None
            if not isinstance(url, str) or not url:
                raise DatasetFormatError(f'{where}: shardlist[{i}] has no "url" string')
            if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
                raise DatasetFormatError(f'{where}: shardlist[{i}] "nsamples" must be an integer >= 0, got {count!r}')
            entries.append((url, count, f"shardlist[{i}]"))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entries.extend((url, None, f"line {number}") for url in wds.shardlists.expand_urls(line))
    shards = []
    for url, count, place in entries:
        if url.startswith("pipe:"):
            raise DatasetFormatError(
                f"{where}, {place}: names the command {url!r}; a shard list may name paths and URLs only "
                "(write pipe: shards in the spec's urls=)"
            )
        shards.append((_resolve_entry(url, location), count))
    if not shards:
        raise DatasetFormatError(f"{where} names no shards")
    return shards
