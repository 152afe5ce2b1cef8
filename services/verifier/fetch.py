"""Bounded HTTP GETs for vendor collateral and roots, behind a seam tests can replace.

Only this module and the CLI's ``roots fetch`` touch the network; verification itself never
does. Every response is size-bounded and must be a 200, and the base URLs are configurable so
an air-gapped site can point at a mirror (and tests at a local fake).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Protocol

from services.mesh.errors import CollateralError

DEFAULT_TIMEOUT = 10.0


class Fetcher(Protocol):
    def __call__(self, url: str, *, max_bytes: int) -> bytes:
        """The body of ``url``; raises :class:`CollateralError` on any failure."""
        ...


def http_get(url: str, *, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """GET ``url`` (http or https only) and return at most ``max_bytes`` of body."""
    if not url.startswith(("https://", "http://")):
        raise CollateralError("fetch.bad_url", f"refusing to fetch {url!r}")
    request = urllib.request.Request(url, headers={"User-Agent": "attestmesh"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            if response.status != 200:
                raise CollateralError("fetch.http_status", f"{url}: HTTP {response.status}")
            body: bytes = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise CollateralError("fetch.http_status", f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CollateralError("fetch.unreachable", f"{url}: {exc}") from None
    if len(body) > max_bytes:
        raise CollateralError("fetch.too_large", f"{url}: more than {max_bytes} bytes")
    return body
