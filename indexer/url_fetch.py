"""Fetching a video by URL: http(s) only, public addresses only, redirects re-checked, streamed under a cap.

The service checks a URL when it is posted (`check`); the worker downloads it inside its job (`download`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin

import anyio
import httpx

from indexer.errors import IndexerError, UserError
from indexer.receive import FileSink, ReceivedFile, UploadTooLargeError, display_name, incoming_path

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
BytesHook = Callable[[int, int | None], None]  # (bytes so far, total when the server said it)


class UrlRefusedError(IndexerError, UserError):
    """The URL is not allowed: another scheme, or a host on a loopback/private/link-local/reserved address."""

    code = "url_refused"


class UrlFetchError(IndexerError, UserError):
    """The download failed: unreachable, timed out, an HTTP error status, or too many redirects."""

    code = "url_fetch_failed"

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable  # a timeout or a 5xx may pass; a 404 or a redirect loop will not


class DownloadCancelledError(IndexerError):
    """The job was cancelled while its file was downloading."""


async def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address the host resolves to (getaddrinfo runs in the loop's thread pool)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UrlFetchError(f"cannot resolve {host!r}: {e.strerror or e}") from e
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def is_public(address: IPAddress) -> bool:
    # An IPv4-mapped IPv6 address (::ffff:10.0.0.1) is judged by the IPv4 address it carries.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class UrlFetcher:
    """Downloads into data/incoming. Each hop's host is resolved once and the connection goes to the
    checked address (Host header and TLS SNI keep the name), so DNS cannot re-point it in between."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        timeout_s: float = 30.0,
        max_duration_s: float = 900.0,
        max_redirects: int = 5,
        resolver: Resolver = resolve_host,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.max_duration_s = max_duration_s
        self.max_redirects = max_redirects
        self._resolve = resolver
        self._transport = transport  # tests answer from memory; None = real network

    async def _pin(self, url: httpx.URL) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
        if url.scheme not in ("http", "https"):
            raise UrlRefusedError(f"only http and https URLs can be fetched, not {url.scheme or 'no'} scheme")
        if not url.host:
            raise UrlRefusedError("the URL has no host")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(url.host)]
        except ValueError:
            addresses = await self._resolve(url.host, port)
        if not addresses:
            raise UrlFetchError(f"{url.host!r} resolves to no address")
        if not self.allow_private:
            bad = [str(a) for a in addresses if not is_public(a)]
            if bad:
                raise UrlRefusedError(
                    f"{url.host!r} resolves to a loopback, private, link-local or reserved address "
                    f"({', '.join(bad)}); this server only fetches from public addresses"
                )
        target = url.copy_with(host=str(addresses[0]))
        headers = {"Host": url.netloc.decode("ascii"), "Accept": "video/*, */*;q=0.5"}
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        return target, headers, extensions

    async def check(self, url: str) -> None:
        """Refuse at once a URL whose first hop is not allowed (each hop is checked again on download)."""
        await self._pin(httpx.URL(url))

    def download(
        self,
        url: str,
        incoming: Path,
        limit: int,
        *,
        on_bytes: BytesHook | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> ReceivedFile:
        """Blocking: download into `incoming` (a worker thread's own event loop); see fetch()."""
        fetch = functools.partial(self.fetch, url, incoming, limit, on_bytes=on_bytes, cancelled=cancelled)
        return anyio.run(fetch)

    async def fetch(
        self,
        url: str,
        incoming: Path,
        limit: int,
        *,
        on_bytes: BytesHook | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> ReceivedFile:
        """Stream `url` into a new file under `incoming`; `on_bytes` sees the progress after each chunk and
        `cancelled()` is asked then too (True aborts with DownloadCancelledError, the partial file removed)."""
        try:
            with anyio.fail_after(self.max_duration_s):
                return await self._fetch(url, incoming, limit, on_bytes, cancelled)
        except TimeoutError as e:
            raise UrlFetchError(f"the download did not finish within {self.max_duration_s:.0f} s") from e
        except httpx.TimeoutException as e:
            raise UrlFetchError(f"the server did not answer within {self.timeout_s:.0f} s") from e
        except httpx.HTTPError as e:
            raise UrlFetchError(f"the download failed: {e}") from e

    async def _fetch(
        self,
        url: str,
        incoming: Path,
        limit: int,
        on_bytes: BytesHook | None,
        cancelled: Callable[[], bool] | None,
    ) -> ReceivedFile:
        # trust_env=False: a proxy from the environment would connect on our behalf, unchecked.
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False, transport=self._transport
        ) as client:
            current = httpx.URL(url)
            for _ in range(self.max_redirects + 1):
                target, headers, extensions = await self._pin(current)
                request = client.build_request("GET", target, headers=headers, extensions=extensions)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location")
                        if not location:
                            raise UrlFetchError(f"{current} redirects without a Location header")
                        current = httpx.URL(urljoin(str(current), location))
                        continue
                    if response.status_code != 200:
                        raise UrlFetchError(
                            f"{current} answered HTTP {response.status_code}, not 200",
                            retryable=response.status_code >= 500 or response.status_code == 429,
                        )
                    declared = response.headers.get("content-length", "")
                    total = int(declared) if declared.isdigit() else None
                    if total is not None and total > limit:
                        raise UploadTooLargeError(limit)
                    name = unquote(PurePosixPath(current.path).name) or None
                    return await _receive(
                        response.aiter_bytes(), incoming, limit, name, total, on_bytes, cancelled
                    )
                finally:
                    await response.aclose()
            raise UrlFetchError(
                f"more than {self.max_redirects} redirects; giving up at {current}", retryable=False
            )


async def _receive(
    chunks: AsyncIterator[bytes],
    incoming: Path,
    limit: int,
    filename: str | None,
    total: int | None,
    on_bytes: BytesHook | None,
    cancelled: Callable[[], bool] | None,
) -> ReceivedFile:
    """Write the body to disk while hashing; the partial file is removed on any failure."""
    sink = FileSink(incoming_path(incoming, filename), limit)
    try:
        async for chunk in chunks:
            if chunk:
                sink.write(chunk)
                if on_bytes is not None:
                    on_bytes(sink.size, total)
                if cancelled is not None and cancelled():
                    raise DownloadCancelledError("the job was cancelled during the download")
        if sink.size == 0:
            raise UrlFetchError("the download is empty", retryable=False)
        digest = sink.finish()
    except BaseException:
        sink.abort()
        raise
    return ReceivedFile(sink.path, digest, sink.size, display_name(filename))
