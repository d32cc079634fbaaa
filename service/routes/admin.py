"""``/admin/reload`` and ``/admin/rollback``, behind a bearer token.

Included only when the settings configure an admin token (and, for the rollback, a
release root): without them the paths do not exist (404), rather than answering 401.
"""

from __future__ import annotations

import functools
import hmac
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, HTTPException
from fastapi.responses import JSONResponse

from service.failures import reason_of
from service.routes.deps import SettingsDep, StateDep


def require_admin(
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(max_length=1024)] = None,
) -> None:
    token = settings.admin_token
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest: the time taken does not tell how much of the token matched.
    if (
        token is None
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(given.encode(), token.get_secret_value().encode())
    ):
        raise HTTPException(
            401, detail="admin token required", headers={"WWW-Authenticate": "Bearer"}
        )


reload_router = APIRouter(dependencies=[Depends(require_admin)])
rollback_router = APIRouter(dependencies=[Depends(require_admin)])


@reload_router.post("/admin/reload")
async def admin_reload(state: StateDep) -> JSONResponse:
    outcome = await state.reload("admin", force=True)
    return JSONResponse(outcome, status_code=200 if outcome["status"] == "reloaded" else 409)


@rollback_router.post("/admin/rollback")
async def admin_rollback(state: StateDep, settings: SettingsDep) -> JSONResponse:
    # The same code as `t2diff rollback` (locked, atomic link switches), then a reload, so
    # the answer says which version serves now.
    # release.links and release.errors are plain Python over the contracts: the one
    # import of the release package the layering contract allows the service.
    from release.errors import ReleaseError
    from release.links import rollback

    release_root = settings.release_root
    assert release_root is not None  # the router is included only with a release root
    try:
        entry = await anyio.to_thread.run_sync(
            functools.partial(rollback, release_root, trigger="admin")
        )
    except (ReleaseError, OSError) as exc:
        return JSONResponse({"status": "failed", "errors": {"rollback": reason_of(exc)}}, 409)
    outcome = await state.reload("admin-rollback", force=True)
    outcome["rollback"] = entry
    return JSONResponse(outcome, status_code=200 if outcome["status"] == "reloaded" else 409)
