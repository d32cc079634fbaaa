#!/usr/bin/env python3
"""Container health probe: GET http://127.0.0.1:$T2DIFF_PORT/<path>, exit 0 on 2xx.

Standard library only, so images need neither curl nor wget.  Used by the Dockerfile's
HEALTHCHECK (``/healthz``, liveness) and by docker-compose.yml (``/readyz``, so that the load
balancer starts only once a replica can answer).

    python healthcheck.py [/healthz|/readyz] [--timeout SECONDS]
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def probe(path: str = "/healthz", timeout: float = 2.0) -> tuple[bool, str]:
    port = os.environ.get("T2DIFF_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path if path.startswith('/') else '/' + path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
            return 200 <= response.status < 300, f"{url} -> {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} -> {exc.code} {exc.read(300).decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url} -> {exc}"


def main(argv: list[str]) -> int:
    path = argv[0] if argv and not argv[0].startswith("--") else "/healthz"
    timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 2.0
    ok, message = probe(path, timeout)
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
