"""Run the recall service under uvicorn: ``python -m service.server`` (settings from env)."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.settings import Settings


def run(settings: Settings | None = None) -> None:
    """Serve until interrupted.  One process, one event loop: scale with replicas, since
    each worker would hold its own copy of the model and the index."""
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The app object (not an import string) so that the settings passed in are the ones
    # used; uvicorn's --factory would rebuild Settings from the environment instead.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )


if __name__ == "__main__":
    run()
