"""Hostile input never gets a 5xx, and never costs the caller its connection.

Every endpoint gets bodies JSON cannot carry back as they came (NaN, Infinity, 1e400, lone
surrogates in keys and values), bodies built to exhaust a parser (10 000 nested arrays,
huge arrays, a 5 000-digit integer), wrong types, non-object top levels, invalid UTF-8 and
empty bodies, plus junk query strings and headers, all through a real uvicorn server over
ONE keep-alive connection: each answer is 4xx (2xx where the input is in fact valid) and
carries ``X-Request-ID``, the connection is never closed, and a valid recall on it
afterwards is answered.  Real Redis, real ONNX Runtime tower and FAISS index (the tiny
export)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from live_server import live_server
from service_fixtures import TINY_MODEL_VERSION, build_version, item_id

from release.links import promote
from service.app import create_app
from service.settings import Settings

TOKEN = "hostile-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = "application/json"


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    content_type: str | None = JSON
    # Endpoints where this body is in fact valid (2xx expected there, 4xx elsewhere).
    valid_on: frozenset[str] = frozenset()


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


RECALL, EVENTS = "/recall", "/events"
BOOM = "/test-only/boom"  # a route added by this test that raises

CASES = [
    # Numbers JSON has no way to send back: the 422 used to echo them and fail to render.
    Case("k NaN", b'{"user_id":"u1","k":NaN}'),
    Case("k Infinity", b'{"user_id":"u1","k":Infinity}'),
    Case("k -Infinity", b'{"user_id":"u1","k":-Infinity}'),
    Case("k 1e400", b'{"user_id":"u1","k":1e400}'),
    Case("k -0", b'{"user_id":"u1","k":-0}'),
    Case("k -0.0", b'{"user_id":"u1","k":-0.0}'),
    Case("budget NaN", b'{"user_id":"u1","budget_ms":NaN}'),
    Case("timestamp NaN", b'{"user_id":"u1","item_id":"i1","timestamp":NaN}'),
    Case("timestamp Infinity", b'{"user_id":"u1","item_id":"i1","timestamp":Infinity}'),
    Case("timestamp -0", b'{"user_id":"u1","item_id":"i1","timestamp":-0.0}', valid_on=frozenset({EVENTS})),
    Case("timestamp 1e400", b'{"user_id":"u1","item_id":"i1","timestamp":1e400}'),
    Case("batch NaN", b'{"events":[{"user_id":"u1","item_id":"i1","timestamp":NaN}]}'),
    Case("k 5000 digits", b'{"user_id":"u1","k":1' + b"0" * 5000 + b"}"),
    # Lone surrogates: valid JSON escapes, no valid UTF-8 (the 422 could not be encoded).
    Case("user surrogate", b'{"user_id":"\\ud800"}'),
    Case("user low surrogate", b'{"user_id":"a\\udfffb","item_id":"i1"}'),
    Case("item surrogate", b'{"user_id":"u1","item_id":"\\ud800"}'),
    Case("key surrogate", b'{"user_id":"u1","\\ud800":1}'),
    Case("all surrogates", b'{"\\ud800\\ud800":"\\udc00","events":[{"\\udfff":NaN}]}'),
    Case("event_id surrogate", b'{"user_id":"u1","item_id":"i1","event_id":"\\ud800"}'),
    # Parser exhaustion.
    Case("10000 nested arrays", nested(10_000)),
    Case("10000 nested in a field", b'{"user_id":' + nested(10_000) + b"}"),
    Case("900 nested in a field", b'{"user_id":' + nested(900) + b"}"),
    Case("deep objects", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    Case("huge array", b'{"user_id":"u1","k":[' + b"0," * 20_000 + b"0]}"),
    Case("huge events", b'{"events":[' + b",".join([b'{"user_id":"u","item_id":"i"}'] * 1500) + b"]}"),
    # Duplicate keys: the last one wins, like every JSON parser here; still a valid body.
    Case("duplicate keys", b'{"user_id":"u1","user_id":"u2","k":5,"k":3}', valid_on=frozenset({RECALL})),
    Case("duplicate event keys", b'{"user_id":"u1","item_id":"a","item_id":"b"}', valid_on=frozenset({EVENTS})),
    # Wrong types and shapes.
    Case("user int", b'{"user_id":5}'),
    Case("user null", b'{"user_id":null}'),
    Case("user object", b'{"user_id":{"$gt":""}}'),
    Case("k string", b'{"user_id":"u1","k":"5"}'),
    Case("k bool", b'{"user_id":"u1","k":true}'),
    Case("k float", b'{"user_id":"u1","k":5.5}'),
    Case("seen string", b'{"user_id":"u1","exclude_seen":"yes"}'),
    Case("control char", b'{"user_id":"a\\u0000b","item_id":"i\\u001f"}'),
    Case("events not a list", b'{"events":{"user_id":"u1"}}'),
    Case("events empty", b'{"events":[]}'),
    Case("events of nulls", b'{"events":[null,1,"x",[]]}'),
    Case("top array", b"[]"),
    Case("top string", b'"u1"'),
    Case("top number", b"5"),
    Case("top null", b"null"),
    Case("top true", b"true"),
    Case("top NaN", b"NaN"),
    # Not JSON at all.
    Case("invalid utf-8 in a string", b'{"user_id":"\xff\xfe"}'),
    Case("invalid utf-8", b"\xff\xfe\x00\xc3\x28"),
    Case("truncated", b'{"user_id":'),
    Case("trailing garbage", b'{"user_id":"u1"}}'),
    Case("empty", b""),
    Case("whitespace", b" \r\n\t "),
    Case("text/plain invalid utf-8", b"\xff\xfe{", content_type="text/plain"),
    Case("no content type", b'{"user_id":"u1","k":NaN}', content_type=None),
    Case("form", b"user_id=u1&k=NaN", content_type="application/x-www-form-urlencoded"),
    Case("json charset latin-1", b'{"user_id":"\xe9"}', content_type="application/json; charset=latin-1"),
]  # fmt: skip

JUNK_QUERIES = [
    "?%ff%fe=%00",
    "?a=NaN&a=Infinity&b[]=1e400",
    "?%ED%A0%80=%ED%A0%80",  # a surrogate, UTF-8 encoded
    "?" + "x=1&" * 2000,
    "?=&&==;;%",
]
JUNK_HEADERS = [
    {"X-Request-Deadline-Ms": "NaN"},
    {"X-Request-Deadline-Ms": "Infinity"},
    {"X-Request-Deadline-Ms": "1e400"},
    {"X-Request-Deadline-Ms": "-0"},
    {"X-Request-Deadline-Ms": "\xff\xfe"},
    {"X-Request-ID": "\xff" * 300},
    {"Authorization": "Bearer \xff\xfe"},
]


@pytest.fixture(scope="module")
def release_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One promoted version: a rollback has nowhere to go (409), so it changes nothing."""
    root = tmp_path_factory.mktemp("hostile")
    build_version(root, TINY_MODEL_VERSION)
    promote(root, TINY_MODEL_VERSION)
    return root


@pytest.fixture(scope="module")
def port(release_root: Path, redis_server: str) -> Iterator[int]:
    settings = Settings(
        artifacts_dir=release_root / "artifacts" / "current",
        index_dir=release_root / "indexes" / "current",
        redis_url=redis_server,
        redis_prefix="t2hostile",
        admin_token=TOKEN,
        release_root=release_root,
        watch_interval_s=0,
        budget_ms=5000,
        redis_timeout_ms=2000,
    )
    app = create_app(settings)

    async def boom() -> None:  # a bug, as far as the server can tell
        raise RuntimeError("a bug")

    app.add_api_route(BOOM, boom, methods=["GET"])
    with live_server(app) as port:
        yield port


class OneConnection:
    """``http.client`` on one socket: fails, instead of quietly reconnecting, when the
    server closed the connection."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.conn.connect()
        self.sock = self.conn.sock

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        assert self.conn.sock is self.sock, "the server closed the connection"
        sent = dict(headers or {})
        if body is not None:
            sent["Content-Length"] = str(len(body))
        # putrequest/putheader: header values go out as given (latin-1), unvalidated.
        self.conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in sent.items():
            self.conn.putheader(name, value.encode("latin-1"))
        self.conn.endheaders(body)
        response = self.conn.getresponse()
        data = response.read()
        assert not response.will_close, f"{method} {path}: the server closes the connection"
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def connection(port: int) -> Iterator[OneConnection]:
    conn = OneConnection(port)
    yield conn
    conn.close()


def check(answer: tuple[int, dict[str, str], bytes], valid: bool, what: str) -> None:
    status, headers, data = answer
    expected = range(200, 300) if valid else range(400, 500)
    assert status in expected, (what, status, data[:500])
    assert headers.get("x-request-id"), (what, status)
    if headers.get("content-type", "").startswith("application/json"):
        json.loads(data)  # a 4xx body is JSON too (strict: no NaN)


def valid_recall_works(conn: OneConnection) -> None:
    status, headers, data = conn.request(
        "POST", RECALL, json.dumps({"user_id": "u1", "k": 3}).encode(), {"Content-Type": JSON}
    )
    assert status == 200, data
    body = json.loads(data)
    assert len(body["items"]) == 3 and body["model_version"] == TINY_MODEL_VERSION
    assert headers["x-request-id"]


def test_hostile_bodies_on_every_post_endpoint(connection: OneConnection) -> None:
    # A known user first, so that a recall that does go through reaches the tower.
    status, _, data = connection.request(
        "POST", EVENTS, json.dumps({"user_id": "u1", "item_id": item_id(3)}).encode(),
        {"Content-Type": JSON},
    )  # fmt: skip
    assert status == 200, data
    for case in CASES:
        headers = {"Content-Type": case.content_type} if case.content_type else {}
        for path in (RECALL, EVENTS):
            answer = connection.request("POST", path, case.body, headers)
            check(answer, path in case.valid_on, f"{path} {case.name}")
        # The admin endpoints take no body: without the token 401, whatever the body.
        for path in ("/admin/reload", "/admin/rollback"):
            check(
                connection.request("POST", path, case.body, headers), False, f"{path} {case.name}"
            )
    valid_recall_works(connection)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {"k NaN", "user surrogate", "10000 nested arrays", "invalid utf-8", "empty"}], ids=lambda c: c.name)  # fmt: skip
def test_admin_endpoints_with_the_token_ignore_the_body(
    connection: OneConnection, case: Case
) -> None:
    headers = {"Content-Type": JSON, **AUTH}
    check(connection.request("POST", "/admin/reload", case.body, headers), True, case.name)
    # One promoted version: nothing to roll back to (409), nothing changed.
    answer = connection.request("POST", "/admin/rollback", case.body, headers)
    check(answer, False, case.name)
    assert answer[0] == 409
    valid_recall_works(connection)


def test_junk_query_strings_and_headers(connection: OneConnection) -> None:
    for query in JUNK_QUERIES:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            check(connection.request("GET", path + query), True, path + query[:40])
        check(connection.request("GET", "/no-such-path" + query), False, query[:40])
        check(connection.request("GET", RECALL + query), False, query[:40])  # 405
        body = json.dumps({"user_id": "u1", "k": 2}).encode()
        check(connection.request("POST", RECALL + query, body, {"Content-Type": JSON}), True, query)
    for headers in JUNK_HEADERS:
        body = json.dumps({"user_id": "u1", "k": 2}).encode()
        answer = connection.request("POST", RECALL, body, {"Content-Type": JSON, **headers})
        valid = "X-Request-Deadline-Ms" not in headers or headers["X-Request-Deadline-Ms"] == "-0"
        check(answer, valid, str(headers))
        answer = connection.request("POST", "/admin/reload", b"", headers)
        check(answer, False, str(headers))
    valid_recall_works(connection)


def test_an_unexpected_error_is_a_json_500_that_keeps_the_connection(
    connection: OneConnection,
) -> None:
    for _ in range(2):
        status, headers, data = connection.request("GET", BOOM)
        assert status == 500, data
        assert json.loads(data) == {
            "detail": "internal error",
            "request_id": headers["x-request-id"],
        }
    valid_recall_works(connection)
