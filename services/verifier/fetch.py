"""Bounded HTTP GETs for vendor collateral and roots, behind a seam tests can replace.

Only this module's callers in the worker and the CLI touch the network; verification itself
never does. Every response is size-bounded and must be a 200, and base URLs are configurable so
an air-gapped site can point at a mirror or a PCCS (and tests at a local fake). Some vendors
put part of the answer in a header (Intel PCS sends issuer chains as URL-encoded PEM headers),
so a response keeps its headers.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

from services.mesh.errors import CollateralError

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Response:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """A header by case-insensitive name."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


class Fetcher(Protocol):
    def __call__(self, url: str, *, max_bytes: int) -> Response:
        """The response to GET ``url``; raises :class:`CollateralError` on any failure."""
        ...


def http_fetch(url: str, *, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> Response:
    """GET ``url`` (http or https only); at most ``max_bytes`` of body."""
    if not url.startswith(("https://", "http://")):
        raise CollateralError("fetch.bad_url", f"refusing to fetch {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "attestmesh"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            if response.status != 200:
                raise CollateralError("fetch.http_status", f"{url}: HTTP {response.status}")
            body: bytes = response.read(max_bytes + 1)
            headers = {k: v[:max_bytes] for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        raise CollateralError("fetch.http_status", f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CollateralError("fetch.unreachable", f"{url}: {exc}") from None
    if len(body) > max_bytes:
        raise CollateralError("fetch.too_large", f"{url}: more than {max_bytes} bytes")
    return Response(body, headers)


def http_get(url: str, *, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Just the body of :func:`http_fetch`."""
    return http_fetch(url, max_bytes=max_bytes, timeout=timeout).body
