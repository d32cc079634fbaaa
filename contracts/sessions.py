"""The Redis layout of a user's recent behaviour, shared by the loader and the service.

Layout (documented in README.md, "Sessions in Redis"):

* key ``{prefix}:session:{user_id}`` is a Redis LIST, oldest behaviour first;
* each element is ``"{timestamp}|{item_id}"``: the Unix time in seconds (a float written
  with ``repr``) and the raw item id as a string; ``|`` splits at its first occurrence, so
  item ids may contain ``|``;
* the list is capped at ``max_len`` elements (``RPUSH`` then ``LTRIM -max_len -1`` in one
  transaction), so the newest behaviours survive;
* an event written with an ``event_id`` (``POST /events``) also sets the STRING key
  ``{prefix}:event:{len(user_id)}:{user_id}:{event_id}`` = ``"1"`` with ``SET NX EX ttl``
  in the same atomic script as the push: a retried event whose key still exists is not
  pushed twice.  The user id's length makes the key unambiguous even when ids contain
  ``:``.  Nothing reads these keys' values.
* key ``{prefix}:active`` is a Redis ZSET of user ids scored by the timestamp of their
  newest behaviour (``ZADD GT``: a late, older event never lowers it).  ``POST /events``
  and ``t2diff sessions load`` maintain it; the service reads its top to warm the xhat
  cache of the most recently active users when a model version is loaded.  It is capped at
  ``ACTIVE_USERS_CAP`` members (the least recent dropped), so it stays bounded.

Values are parsed strictly: an element that does not match the layout is skipped and
counted, never evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_PREFIX = "t2diff"
DEFAULT_MAX_LEN = 200
MAX_ID_LENGTH = 128
# Members kept in the activity ZSET: far more than any warm reads (XHAT_WARM_USERS), and
# ~100 MB of Redis at most.
ACTIVE_USERS_CAP = 1_000_000


def session_key(user_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:session:{user_id}"


def event_key(user_id: str, event_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Idempotency key of one written event (see the module docstring)."""
    return f"{prefix}:event:{len(user_id)}:{user_id}:{event_id}"


def active_users_key(prefix: str = DEFAULT_PREFIX) -> str:
    """The ZSET of user ids by last-activity timestamp (see the module docstring)."""
    return f"{prefix}:active"


def encode_event(item_id: str, timestamp: float) -> str:
    return f"{float(timestamp)!r}|{item_id}"


@dataclass
class Session:
    """A user's behaviours, oldest first, as parallel lists."""

    item_ids: list[str] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    malformed: int = 0

    def __len__(self) -> int:
        return len(self.item_ids)


def decode_session(raw: list[bytes | str]) -> Session:
    session = Session()
    for element in raw:
        text = element.decode("utf-8", "replace") if isinstance(element, bytes) else element
        stamp, sep, item_id = text.partition("|")
        try:
            value = float(stamp)
        except ValueError:
            value = math.nan
        if not sep or not item_id or not math.isfinite(value) or len(item_id) > MAX_ID_LENGTH:
            session.malformed += 1
            continue
        session.item_ids.append(item_id)
        session.timestamps.append(value)
    return session
