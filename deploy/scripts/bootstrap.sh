#!/bin/sh
# One-shot bootstrap of an empty deployment (compose service `bootstrap`, k8s Job
# `t2diff-bootstrap`).  Runs in the `trainer` image with the shared data volume as cwd.
#
#   1. if there is no artifacts/current + indexes/current yet (or T2DIFF_BOOTSTRAP_FORCE=1):
#      synthesise data (unless T2DIFF_BOOTSTRAP_DATA names a log), train a small model,
#      export it, build its index, then point both `current` links at the new version;
#   2. if Redis holds no session yet (T2DIFF_BOOTSTRAP_SESSIONS=auto, the default), load
#      the sessions of that log into it; `always` reloads, `never` skips.
#
# Idempotent: a second run with everything in place only checks and exits 0, so the api
# (which waits for this job to complete successfully) restarts without retraining.
set -eu

ROOT="${T2DIFF_DATA_ROOT:-/data}"
DATA="${T2DIFF_BOOTSTRAP_DATA:-}"
SYNTH_DIR="${T2DIFF_BOOTSTRAP_SYNTH_DIR:-data/synth}"
EPOCHS="${T2DIFF_BOOTSTRAP_EPOCHS:-2}"
DEVICE="${T2DIFF_BOOTSTRAP_DEVICE:-cpu}"
# The served model's U-Net width: 16 meets the tower's latency targets (2-core CPU p50
# 10 ms, H100 p99 2 ms; docs/results/inference.md) at HR@10 within one std of width 32
# (docs/results/model-quality.md, "U-Net width"); 32 is the training default.
UNET_WIDTH="${T2DIFF_BOOTSTRAP_UNET_WIDTH:-16}"
VERSION="${T2DIFF_BOOTSTRAP_VERSION:-bootstrap-$(date -u +%Y%m%dT%H%M%SZ)}"
FORCE="${T2DIFF_BOOTSTRAP_FORCE:-0}"
SESSIONS="${T2DIFF_BOOTSTRAP_SESSIONS:-auto}"
# Redis: the URL, and its password and TLS files as the service reads them
# (T2DIFF_REDIS_PASSWORD, T2DIFF_REDIS_TLS_CA_FILE, ...: docs/operations.md).  Exported, not
# passed on command lines, where a password in the URL would show in `ps`.
T2DIFF_REDIS_URL="${T2DIFF_REDIS_URL:-redis://redis:6379/0}"
export T2DIFF_REDIS_URL
REDIS_PREFIX="${T2DIFF_REDIS_PREFIX:-t2diff}"

log() { printf '%s bootstrap: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# Re-point DIR/current at VERSION atomically: a new relative symlink renamed over the old
# one (rename(2) is atomic), so a reader never sees a missing or half-written pointer, and
# the link stays valid wherever the volume is mounted.  The same steps as
# release/links.py's switch_link, which `t2diff rebuild` / `promote` / `rollback` use;
# the first of those records this bootstrap version in releases.jsonl (so a rollback can
# return to it).  Kept in shell so this script needs no extra CLI call for it.
point_current() {
    ln -sfn "$2" "$1/.current.$$"
    mv -Tf "$1/.current.$$" "$1/current"
}

# The interactions log to train on and load sessions from; synthesised once if not given.
ensure_data() {
    if [ -z "$DATA" ]; then
        DATA="$SYNTH_DIR/interactions.csv"
        if [ ! -f "$DATA" ]; then
            log "synthesising data into $SYNTH_DIR"
            t2diff data synth --out "$SYNTH_DIR"
        fi
    fi
    [ -e "$DATA" ] || { log "data $DATA does not exist"; exit 1; }
}

mkdir -p "$ROOT"
cd "$ROOT"

if [ "$FORCE" != "1" ] && [ -e artifacts/current ] && [ -e indexes/current ]; then
    log "artifacts/current -> $(readlink artifacts/current), indexes/current -> $(readlink indexes/current): nothing to build"
else
    ensure_data
    log "training $VERSION on $DATA ($EPOCHS epochs, device $DEVICE, U-Net width $UNET_WIDTH)"
    t2diff train --data "$DATA" --out "runs/$VERSION" --epochs "$EPOCHS" --device "$DEVICE" \
        --set "unet_width=$UNET_WIDTH"
    t2diff evaluate --run "runs/$VERSION" || log "evaluate failed (not fatal for a bootstrap model)"
    t2diff export --run "runs/$VERSION" --out "artifacts/$VERSION"
    t2diff build-index --artifacts "artifacts/$VERSION" --out "indexes/$VERSION"
    # Index first, artifacts last: nothing serves yet, but keep the order the rebuild uses.
    point_current indexes "$VERSION"
    point_current artifacts "$VERSION"
    log "current -> $VERSION"
fi

# Does Redis already hold sessions?  Exit 0 = yes, 1 = no, 3 = Redis unreachable for 60 s.
redis_has_sessions() {
    python - "$REDIS_PREFIX" <<'PY'
import os
import sys
import time

import redis

from service.sessions import redact_redis_url, redis_connection_kwargs

url, prefix = os.environ["T2DIFF_REDIS_URL"], sys.argv[1]
auth_and_tls = redis_connection_kwargs(
    url,
    password=os.environ.get("T2DIFF_REDIS_PASSWORD") or None,
    tls_ca_file=os.environ.get("T2DIFF_REDIS_TLS_CA_FILE") or None,
    tls_cert_file=os.environ.get("T2DIFF_REDIS_TLS_CERT_FILE") or None,
    tls_key_file=os.environ.get("T2DIFF_REDIS_TLS_KEY_FILE") or None,
)
client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5, **auth_and_tls)
deadline = time.monotonic() + 60
while True:
    try:
        client.ping()
        break
    except redis.RedisError as exc:
        if time.monotonic() > deadline:
            shown = redact_redis_url(url)
            print(f"redis at {shown} did not answer for 60 s: {exc}", file=sys.stderr)
            sys.exit(3)
        time.sleep(1)
found = next(client.scan_iter(match=f"{prefix}:session:*", count=1000), None)
sys.exit(0 if found is not None else 1)
PY
}

load_sessions() {
    ensure_data
    log "loading sessions from $DATA into redis"
    t2diff sessions load --data "$DATA"
}

case "$SESSIONS" in
    never) log "session loading disabled" ;;
    always) load_sessions ;;
    auto)
        status=0
        redis_has_sessions || status=$?
        case "$status" in
            0) log "redis already holds sessions (kept by AOF): not reloading" ;;
            1) load_sessions ;;
            *) log "cannot reach redis"; exit 1 ;;
        esac
        ;;
    *) log "T2DIFF_BOOTSTRAP_SESSIONS must be auto, always or never, not '$SESSIONS'"; exit 2 ;;
esac
log "done"
