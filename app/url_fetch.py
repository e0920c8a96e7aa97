"""Fetching a video by URL: http(s) only, public addresses only, redirects re-checked, streamed under a cap."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urljoin

import anyio
import httpx

from app.uploads import ReceivedFile, UploadTooLargeError, receive_stream

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]


class UrlRefusedError(Exception):
    """The URL is not allowed: another scheme, or a host on a loopback/private/link-local/reserved address."""


class UrlFetchError(Exception):
    """The download failed: unreachable, timed out, an HTTP error status, or too many redirects."""


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

    async def fetch(self, url: str, incoming: Path, limit: int) -> ReceivedFile:
        try:
            with anyio.fail_after(self.max_duration_s):
                return await self._fetch(url, incoming, limit)
        except TimeoutError as e:
            raise UrlFetchError(f"the download did not finish within {self.max_duration_s:.0f} s") from e
        except httpx.TimeoutException as e:
            raise UrlFetchError(f"the server did not answer within {self.timeout_s:.0f} s") from e
        except httpx.HTTPError as e:
            raise UrlFetchError(f"the download failed: {e}") from e

    async def _fetch(self, url: str, incoming: Path, limit: int) -> ReceivedFile:
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
                        raise UrlFetchError(f"{current} answered HTTP {response.status_code}, not 200")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise UploadTooLargeError(limit)
                    name = unquote(PurePosixPath(current.path).name) or None
                    return await receive_stream(response.aiter_bytes(), incoming, limit, name)
                finally:
                    await response.aclose()
            raise UrlFetchError(f"more than {self.max_redirects} redirects; giving up at {current}")
