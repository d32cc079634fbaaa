"""Users' recent behaviours in Redis (layout: ``contracts.sessions``).

* :class:`SessionStore` is the service's asynchronous reader/writer, over ``redis.asyncio``
  with a bounded, blocking connection pool and tight timeouts, so a slow or dead Redis turns
  into a fast error rather than piling up connections or stalling requests.
* :func:`load_sessions_from_sequences` is the synchronous bulk loader behind
  ``t2diff sessions load``: it writes each user's newest behaviours from a training log.
* :func:`redis_connection_kwargs` turns the auth and TLS settings into keyword arguments of
  redis-py's ``from_url``; the URL itself (``redis://[[user]:password@]host:port/db``,
  ``rediss://`` for TLS, query options such as ``?ssl_check_hostname=false``) is parsed by
  redis-py, never here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from contracts.sessions import (
    ACTIVE_USERS_CAP,
    DEFAULT_PREFIX,
    Session,
    active_users_key,
    decode_session,
    encode_event,
    event_key,
    session_key,
)

if TYPE_CHECKING:  # model.data needs pandas, which a serving install may not have.
    from model.data import SequenceData
    from service.settings import Settings

log = logging.getLogger(__name__)

# Append one user's events atomically (a Lua script runs alone on the server): for each
# event, if it carries an id, SET its idempotency key NX with a TTL and skip the event when
# the key already existed; RPUSH the others; LTRIM the list to its cap; when something was
# pushed, raise the user's score in the activity ZSET to the newest event's timestamp
# (ZADD GT) and cap the ZSET.  Returns the number pushed.  KEYS[1] = the session list,
# KEYS[2] = the activity ZSET, KEYS[3..] = the idempotency keys of the events that have an
# id, in order; ARGV = max_len, ttl, activity cap, user id, newest timestamp, then per event
# its encoded value and "1"/"0" (has an idempotency key).
APPEND_EVENTS_LUA = """
local max_len = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local active_cap = tonumber(ARGV[3])
local fixed = 5
local n = (#ARGV - fixed) / 2
local next_key = 3
local pushed = 0
for i = 1, n do
  local value = ARGV[fixed - 1 + 2 * i]
  local fresh = true
  if ARGV[fixed + 2 * i] == "1" then
    fresh = redis.call("SET", KEYS[next_key], "1", "NX", "EX", ttl)
    next_key = next_key + 1
  end
  if fresh then
    redis.call("RPUSH", KEYS[1], value)
    pushed = pushed + 1
  end
end
if pushed > 0 then
  redis.call("LTRIM", KEYS[1], -max_len, -1)
  redis.call("ZADD", KEYS[2], "GT", ARGV[5], ARGV[4])
  if redis.call("ZCARD", KEYS[2]) > active_cap then
    redis.call("ZREMRANGEBYRANK", KEYS[2], 0, -active_cap - 1)
  end
end
return pushed
"""


TLS_SCHEME = "rediss"


def redis_connection_kwargs(
    redis_url: str,
    password: str | None = None,
    tls_ca_file: Path | str | None = None,
    tls_cert_file: Path | str | None = None,
    tls_key_file: Path | str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for redis-py's ``from_url`` beside ``redis_url``.

    ``password`` is for a URL without one (it comes from a Secret, not the URL): redis-py
    gives what the URL says precedence over these arguments, so ``redis://:pw@host`` or
    ``redis://user:pw@host`` (an ACL user) wins, and ``redis://user@host`` takes its
    password from here.  The TLS files (a CA bundle to verify the server, and a client
    certificate and key for mutual TLS) need a ``rediss://`` URL: on a plain connection they
    would be silently meaningless, so that raises ``ValueError``.
    """
    kwargs: dict[str, Any] = {}
    if password:
        kwargs["password"] = password
    files = {
        "ssl_ca_certs": tls_ca_file,
        "ssl_certfile": tls_cert_file,
        "ssl_keyfile": tls_key_file,
    }
    given = {name: str(path) for name, path in files.items() if path}
    if given and urlsplit(redis_url).scheme.lower() != TLS_SCHEME:
        raise ValueError(
            f"Redis TLS files ({', '.join(sorted(given))}) need a rediss:// URL, "
            f"not {redact_redis_url(redis_url)}"
        )
    if bool(tls_cert_file) != bool(tls_key_file):
        raise ValueError(
            "a Redis TLS client certificate needs its key, and the key its certificate"
        )
    kwargs.update(given)
    return kwargs


def redact_redis_url(redis_url: str) -> str:
    """``redis_url`` with its password replaced by ``***``, for logs and error messages."""
    try:
        parts = urlsplit(redis_url)
        if parts.password is None:
            return redis_url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        netloc = f"{user}:***@{host}{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:  # unparsable: show nothing that could hold a secret
        return "<unparsable Redis URL>"


def settings_connection_kwargs(settings: Settings) -> dict[str, Any]:
    """:func:`redis_connection_kwargs` from the service settings."""
    password = settings.redis_password
    return redis_connection_kwargs(
        settings.redis_url,
        password=password.get_secret_value() if password is not None else None,
        tls_ca_file=settings.redis_tls_ca_file,
        tls_cert_file=settings.redis_tls_cert_file,
        tls_key_file=settings.redis_tls_key_file,
    )


@dataclass(frozen=True)
class NewEvent:
    """One behaviour to append: raw item id, Unix seconds, optional idempotency id."""

    user_id: str
    item_id: str
    timestamp: float
    event_id: str | None = None


class SessionStore:
    """Read and append users' sessions; one instance per process, shared by all requests.

    Must be created inside the event loop that uses it (the app's lifespan): the pool's
    connections and condition variable belong to that loop.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str = DEFAULT_PREFIX,
        timeout_ms: int = 50,
        connect_timeout_ms: int = 200,
        pool_timeout_ms: int = 50,
        max_connections: int = 32,
        retries: int = 1,
        connection_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """``connection_kwargs``: auth and TLS (:func:`redis_connection_kwargs`)."""
        self.prefix = prefix
        # BlockingConnectionPool: at most max_connections sockets, and a request that finds
        # none free waits pool_timeout_ms then fails (the default pool raises immediately or,
        # unbounded, opens sockets until Redis refuses).
        self._pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=pool_timeout_ms / 1000,
            socket_timeout=timeout_ms / 1000,
            socket_connect_timeout=connect_timeout_ms / 1000,
            # One immediate retry covers a pooled connection that Redis closed while idle;
            # redis-py's default (3 retries with backoff) would multiply the timeouts.  Only
            # connection errors are retried: a read that timed out against a frozen Redis
            # would time out again and double the wait (measured: 103 ms for a 50 ms timeout).
            retry=Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
            **dict(connection_kwargs or {}),
        )
        self._client = aioredis.Redis(connection_pool=self._pool)
        self._append_events = self._client.register_script(APPEND_EVENTS_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionStore:
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout_ms=settings.redis_timeout_ms,
            connect_timeout_ms=settings.redis_connect_timeout_ms,
            pool_timeout_ms=settings.redis_pool_timeout_ms,
            max_connections=settings.redis_max_connections,
            connection_kwargs=settings_connection_kwargs(settings),
        )

    def key(self, user_id: str) -> str:
        return session_key(user_id, self.prefix)

    @property
    def active_key(self) -> str:
        return active_users_key(self.prefix)

    async def recent_users(self, limit: int) -> list[str]:
        """Up to ``limit`` user ids, the most recently active first (the activity ZSET)."""
        if limit <= 0:
            return []
        raw = await self._client.zrevrange(self.active_key, 0, limit - 1)
        return [r.decode("utf-8", "replace") if isinstance(r, bytes) else r for r in raw]

    async def scan_users(self, limit: int, count: int = 1000) -> list[str]:
        """Up to ``limit`` user ids that have a session, in no particular order: the
        fallback when the activity ZSET is empty (sessions written by an older loader).
        SCAN, never KEYS: it does not block Redis on a large keyspace."""
        head = self.key("")
        users: list[str] = []
        async for key in self._client.scan_iter(match=head + "*", count=count):
            text = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            users.append(text[len(head) :])
            if len(users) >= limit:
                break
        return users

    async def get_sessions(self, user_ids: Sequence[str], max_len: int) -> list[Session]:
        """The newest ``max_len`` behaviours of each user (oldest first), one round trip."""
        if not user_ids:
            return []
        # No MULTI: reads of independent keys need no atomicity, only one round trip.
        async with self._client.pipeline(transaction=False) as pipe:
            for user_id in user_ids:
                pipe.lrange(self.key(user_id), -max_len, -1)
            raw_lists = await pipe.execute()
        sessions = [decode_session(raw) for raw in raw_lists]
        malformed = sum(s.malformed for s in sessions)
        if malformed:
            log.warning("skipped %d malformed session element(s)", malformed)
        return sessions

    async def append_events(
        self, events: Sequence[NewEvent], max_len: int, dedup_ttl_s: int
    ) -> tuple[int, int]:
        """Append events (in the given order per user), idempotently on ``event_id``.

        Each user's events go in one atomic script (push, idempotency keys, cap); the users
        of one call share one pipelined round trip.  Returns (written, duplicates).
        """
        by_user: dict[str, list[NewEvent]] = {}
        for event in events:
            by_user.setdefault(event.user_id, []).append(event)
        if not by_user:
            return 0, 0
        async with self._client.pipeline(transaction=False) as pipe:
            for user_id, user_events in by_user.items():
                keys = [self.key(user_id), self.active_key]
                newest = max(event.timestamp for event in user_events)
                args: list[str | int | float] = [
                    max_len,
                    dedup_ttl_s,
                    ACTIVE_USERS_CAP,
                    user_id,
                    repr(float(newest)),
                ]
                for event in user_events:
                    args.append(encode_event(event.item_id, event.timestamp))
                    if event.event_id is None:
                        args.append("0")
                    else:
                        args.append("1")
                        keys.append(event_key(user_id, event.event_id, self.prefix))
                await self._append_events(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        written = 0
        for reply in replies:
            if isinstance(reply, bool) or not isinstance(reply, int):
                raise RedisError(f"unexpected reply from the append script: {reply!r}")
            written += reply
        return written, len(events) - written

    async def ping(self) -> bool:
        return bool(await self._client.ping())

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()


def load_sessions_from_sequences(
    redis_url: str,
    data: SequenceData,
    prefix: str = DEFAULT_PREFIX,
    max_len: int = 200,
    batch_users: int = 500,
    replace: bool = True,
    connection_kwargs: Mapping[str, Any] | None = None,
) -> int:
    """Write every user's newest ``max_len`` behaviours of ``data`` to Redis.

    With ``replace`` a user's list is deleted first (the log is the truth); otherwise the
    behaviours are appended and the list capped.  Each user's newest timestamp goes into
    the activity ZSET (``ZADD GT``), which the service reads to warm its xhat cache.  Users
    go in batches of ``batch_users``, each batch one MULTI transaction: one round trip, and
    no reader sees a user's list deleted but not yet refilled.  ``connection_kwargs``: auth
    and TLS (:func:`redis_connection_kwargs`).  Returns the number of users written.
    """
    if max_len <= 0 or batch_users <= 0:
        raise ValueError("max_len and batch_users must be positive")
    if data.items.size and int(data.items.min()) < 1:
        raise ValueError("SequenceData.items holds a padding token (0); tokens are 1..n_items")
    item_ids = [str(item) for item in data.item_ids]
    offsets = data.offsets
    written = 0
    active = active_users_key(prefix)
    client = redis.Redis.from_url(redis_url, **dict(connection_kwargs or {}))
    try:
        for first in range(0, data.n_users, batch_users):
            with client.pipeline(transaction=True) as pipe:
                queued = 0
                for user in range(first, min(first + batch_users, data.n_users)):
                    start, end = int(offsets[user]), int(offsets[user + 1])
                    start = max(start, end - max_len)
                    key = session_key(str(data.user_ids[user]), prefix)
                    if replace:
                        pipe.delete(key)
                    if end <= start:
                        continue
                    values = [
                        encode_event(item_ids[int(token) - 1], float(ts))
                        for token, ts in zip(
                            data.items[start:end], data.timestamps[start:end], strict=True
                        )
                    ]
                    pipe.rpush(key, *values)
                    if not replace:
                        pipe.ltrim(key, -max_len, -1)
                    pipe.zadd(
                        active,
                        {str(data.user_ids[user]): float(data.timestamps[end - 1])},
                        gt=True,
                    )
                    queued += 1
                pipe.execute()
            written += queued
    finally:
        client.close()
    return written
