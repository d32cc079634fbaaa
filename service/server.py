"""Run the recall service under uvicorn: ``python -m service.server`` (settings from env)."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.observability import configure_logging
from service.settings import Settings


def run(settings: Settings | None = None) -> None:
    """Serve until interrupted.

    One worker (the default): the app object is built here from ``settings``.  With
    ``workers > 1`` uvicorn starts that many processes, each building its app with
    ``create_app()`` from the ``T2DIFF_*`` environment (so overrides passed in as
    ``settings`` but not in the environment do not reach them); each worker loads its own
    model, index and Redis pool and watches for new versions by itself.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level.lower(),
        # Our middleware writes one JSON access line per request, with the request id.
        "access_log": False,
        "log_config": None,  # keep the JSON handler configured above
    }
    if settings.workers > 1:
        uvicorn.run("service.app:create_app", factory=True, workers=settings.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)


if __name__ == "__main__":
    run()
