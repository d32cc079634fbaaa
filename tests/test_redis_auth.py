"""Redis with AUTH (a password, an ACL user) and TLS (``rediss://``, mutual TLS), against a
real ``redis-server`` started with ``--requirepass`` and, where this build has TLS, a
``--tls-port``: the service reads sessions with the right credentials, answers degraded
(never 5xx) with wrong ones, and ``t2diff sessions load`` writes with the same settings.
The certificates are a throw-away CA made with ``openssl`` in the test's directory."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_fixtures import TINY_MODEL_VERSION, build_version, item_id
from typer.testing import CliRunner

from contracts.sessions import encode_event, session_key
from service.app import create_app
from service.sessions import redact_redis_url, redis_connection_kwargs
from service.settings import Settings
from t2diff_cli.local_stack import LOOPBACK, RedisServer, free_port, redis_binary
from t2diff_cli.main import app as cli

PASSWORD = "s3cret/pw:with@odd chars"  # URL-special characters: quoting must be right
PREFIX = "t2auth"
USER = "u-auth"
USER_ITEMS = [item_id(row) for row in (3, 13, 23)]

pytestmark = pytest.mark.skipif(redis_binary() is None, reason="redis-server is not on PATH")


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_version(tmp_path_factory.mktemp("auth"), TINY_MODEL_VERSION)


@pytest.fixture
def auth_redis() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


def plain_url(server: RedisServer) -> str:
    """The server's URL without credentials."""
    return f"redis://{LOOPBACK}:{server.port}/0"


def write_session(client: redis.Redis) -> None:
    key = session_key(USER, PREFIX)
    client.delete(key)
    client.rpush(
        key, *(encode_event(item, 1_700_000_000.0 + n) for n, item in enumerate(USER_ITEMS))
    )


def service(version: tuple[Path, Path], **settings: Any) -> TestClient:
    values: dict[str, Any] = {
        "artifacts_dir": version[0],
        "index_dir": version[1],
        "redis_prefix": PREFIX,
        "watch_interval_s": 0,
        "budget_ms": 2000,
        "xhat_warm_users": 0,
    }
    values.update(settings)
    return TestClient(create_app(Settings(**values)))


def recall(client: TestClient) -> dict[str, Any]:
    response = client.post("/recall", json={"user_id": USER, "k": 5})
    assert response.status_code == 200, response.text
    return response.json()


def assert_reads_the_session(client: TestClient) -> None:
    body = recall(client)
    assert body["degraded"] is False, body
    assert body["cold_start"] is False, body  # the session was read: the user is known
    write = client.post("/events", json={"user_id": USER, "item_id": item_id(33)})
    assert write.status_code == 200, write.text


def assert_degraded_not_5xx(client: TestClient) -> None:
    for _ in range(3):
        body = recall(client)
        assert body["degraded"] is True, body
        assert body["degraded_reason"].startswith("redis_"), body
        assert len(body["items"]) == 5
    write = client.post("/events", json={"user_id": USER, "item_id": item_id(33)})
    assert write.status_code == 503, write.text
    assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- settings


def test_connection_kwargs_leave_the_url_to_redis_py() -> None:
    # A password from a Secret applies to a URL without one; redis-py lets the URL win.
    kwargs = redis_connection_kwargs("redis://h:6379/0", password="from-secret")
    pool = redis.ConnectionPool.from_url("redis://h:6379/0", **kwargs)
    assert pool.connection_kwargs["password"] == "from-secret"
    pool = redis.ConnectionPool.from_url("redis://:in%40url@h:6379/0", **kwargs)
    assert pool.connection_kwargs["password"] == "in@url"
    pool = redis.ConnectionPool.from_url("redis://acl-user@h:6379/0", **kwargs)
    assert pool.connection_kwargs["username"] == "acl-user"
    assert pool.connection_kwargs["password"] == "from-secret"
    assert redis_connection_kwargs("redis://h/0") == {}
    # TLS files go to the SSL connection, and need rediss://.
    tls = redis_connection_kwargs("rediss://h:6380/0", tls_ca_file=Path("/ca.pem"))
    assert tls == {"ssl_ca_certs": "/ca.pem"}
    with pytest.raises(ValueError, match="rediss://"):
        redis_connection_kwargs("redis://:pw@h/0", tls_ca_file="/ca.pem")
    with pytest.raises(ValueError, match="key"):
        redis_connection_kwargs("rediss://h/0", tls_cert_file="/c.pem")


def test_passwords_never_reach_a_message() -> None:
    assert redact_redis_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_redis_url("rediss://:p%40w@[::1]:6380/2") == "rediss://:***@[::1]:6380/2"
    assert redact_redis_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_redis_url("redis://user@host/0") == "redis://user@host/0"
    assert "pw" not in redact_redis_url("redis://u:pw@host:notaport/0")


def test_settings_read_auth_and_tls_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("T2DIFF_REDIS_URL", "rediss://redis.example:6380/0")
    monkeypatch.setenv("T2DIFF_REDIS_PASSWORD", "from-secret")
    monkeypatch.setenv("T2DIFF_REDIS_TLS_CA_FILE", str(tmp_path / "ca.pem"))
    settings = Settings()
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == "from-secret"
    assert "from-secret" not in repr(settings)
    assert settings.redis_tls_ca_file == tmp_path / "ca.pem"
    # An optional Secret key left empty means "no password", an empty path "no file".
    monkeypatch.setenv("T2DIFF_REDIS_PASSWORD", "")
    monkeypatch.setenv("T2DIFF_REDIS_TLS_CA_FILE", "")
    settings = Settings()
    assert settings.redis_password is None and settings.redis_tls_ca_file is None
    # TLS files on a plain URL are refused at start-up, not ignored.
    monkeypatch.setenv("T2DIFF_REDIS_URL", "redis://redis.example:6379/0")
    monkeypatch.setenv("T2DIFF_REDIS_TLS_CA_FILE", str(tmp_path / "ca.pem"))
    with pytest.raises(ValidationError, match="rediss://"):
        Settings()


# --------------------------------------------------------------------------- AUTH


@pytest.mark.parametrize("where", ["setting", "url"])
def test_service_reads_sessions_with_the_password(
    version: tuple[Path, Path], auth_redis: RedisServer, where: str
) -> None:
    admin = redis.Redis.from_url(auth_redis.url)
    try:
        write_session(admin)
    finally:
        admin.close()
    if where == "setting":
        settings = {"redis_url": plain_url(auth_redis), "redis_password": PASSWORD}
    else:
        settings = {"redis_url": auth_redis.url}  # redis://:PASSWORD@host:port/0, quoted
    with service(version, **settings) as client:
        assert_reads_the_session(client)


def test_service_with_an_acl_user(version: tuple[Path, Path], auth_redis: RedisServer) -> None:
    admin = redis.Redis.from_url(auth_redis.url)
    try:
        write_session(admin)
        # An ACL user limited to the service's keys and the commands it uses.
        admin.acl_setuser(
            "t2diff",
            enabled=True,
            passwords=["+acl-pw"],
            keys=[f"{PREFIX}:*"],
            commands=["+@read", "+@write", "+@scripting", "+@connection", "+info"],
        )
    finally:
        admin.close()
    # The user in the URL, the password from the setting (a Secret).
    url = f"redis://t2diff@{LOOPBACK}:{auth_redis.port}/0"
    with service(version, redis_url=url, redis_password="acl-pw") as client:
        assert_reads_the_session(client)
    with service(version, redis_url=f"redis://t2diff:acl-pw@{LOOPBACK}:{auth_redis.port}/0") as c:
        assert_reads_the_session(c)


@pytest.mark.parametrize("password", [None, "wrong"])
def test_wrong_or_missing_password_answers_degraded(
    version: tuple[Path, Path], auth_redis: RedisServer, password: str | None
) -> None:
    with service(version, redis_url=plain_url(auth_redis), redis_password=password) as client:
        assert_degraded_not_5xx(client)


def _interactions(path: Path) -> Path:
    rows = [("a", item_id(1), 1.0), ("a", item_id(2), 2.0), ("b", item_id(5), 3.0)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(path, index=False)
    return path


def test_sessions_load_cli_with_the_password(auth_redis: RedisServer, tmp_path: Path) -> None:
    data = _interactions(tmp_path / "interactions.csv")
    runner = CliRunner()
    args = ["sessions", "load", "--data", str(data), "--prefix", PREFIX]
    env = {"T2DIFF_REDIS_URL": plain_url(auth_redis), "T2DIFF_REDIS_PASSWORD": PASSWORD}
    result = runner.invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    assert "loaded sessions of 2 users" in result.output
    admin = redis.Redis.from_url(auth_redis.url)
    try:
        assert admin.llen(session_key("a", PREFIX)) == 2
    finally:
        admin.close()
    # A wrong password in the URL: a clear error, exit 2, and the password is not echoed.
    bad_url = f"redis://:not-it@{LOOPBACK}:{auth_redis.port}/0"
    result = runner.invoke(cli, [*args, "--redis-url", bad_url], env={"T2DIFF_REDIS_PASSWORD": ""})
    assert result.exit_code == 2, result.output
    assert "not-it" not in result.output and "***" in result.output


# --------------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=directory,
    )  # fmt: skip


def _make_cert(directory: Path, ca: str, name: str, extension: str) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(extension + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "1", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, and an
    unrelated CA (what a client with the wrong bundle trusts)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _make_cert(directory, "ca", "server", f"subjectAltName=IP:{LOOPBACK}")
    _make_cert(directory, "ca", "client", "extendedKeyUsage=clientAuth")
    return directory


def tls_server(certs: Path, clients: str) -> tuple[RedisServer, int]:
    tls_port = free_port()
    extra = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(certs / "server.crt"),
        "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"),
        "--tls-auth-clients", clients,
    ]  # fmt: skip
    server = RedisServer(password=PASSWORD, extra_args=extra)
    try:
        server.start()
    except RuntimeError as exc:  # a redis-server built without TLS refuses --tls-port
        server.close()
        pytest.skip(f"this redis-server has no TLS: {str(exc)[-300:]}")
    return server, tls_port


@pytest.fixture
def tls_redis(certs: Path) -> Iterator[tuple[RedisServer, int]]:
    server, tls_port = tls_server(certs, "no")
    try:
        yield server, tls_port
    finally:
        server.close()


def test_service_over_tls(
    version: tuple[Path, Path], certs: Path, tls_redis: tuple[RedisServer, int], tmp_path: Path
) -> None:
    server, tls_port = tls_redis
    url = f"rediss://{LOOPBACK}:{tls_port}/0"
    # Sessions written over TLS by the CLI, with the CA and the password from the environment.
    data = _interactions(tmp_path / "interactions.csv")
    env = {
        "T2DIFF_REDIS_URL": url,
        "T2DIFF_REDIS_PASSWORD": PASSWORD,
        "T2DIFF_REDIS_TLS_CA_FILE": str(certs / "ca.crt"),
    }
    result = CliRunner().invoke(
        cli, ["sessions", "load", "--data", str(data), "--prefix", PREFIX], env=env
    )
    assert result.exit_code == 0, result.output
    admin = redis.Redis.from_url(url, password=PASSWORD, ssl_ca_certs=str(certs / "ca.crt"))
    try:
        assert admin.llen(session_key("a", PREFIX)) == 2
        write_session(admin)
    finally:
        admin.close()
    tls = {"redis_url": url, "redis_password": PASSWORD}
    with service(version, **tls, redis_tls_ca_file=certs / "ca.crt") as client:
        assert_reads_the_session(client)
    # A server certificate that the given CA did not sign: no session, a degraded answer.
    with service(version, **tls, redis_tls_ca_file=certs / "other-ca.crt") as client:
        assert_degraded_not_5xx(client)
    # The right CA but the wrong password.
    wrong = {"redis_url": url, "redis_password": "wrong"}
    with service(version, **wrong, redis_tls_ca_file=certs / "ca.crt") as client:
        assert_degraded_not_5xx(client)


def test_service_over_mutual_tls(version: tuple[Path, Path], certs: Path) -> None:
    server, tls_port = tls_server(certs, "yes")
    try:
        url = f"rediss://{LOOPBACK}:{tls_port}/0"
        client_cert = {
            "redis_tls_cert_file": certs / "client.crt",
            "redis_tls_key_file": certs / "client.key",
        }
        tls = {"redis_url": url, "redis_password": PASSWORD, "redis_tls_ca_file": certs / "ca.crt"}
        admin = redis.Redis.from_url(
            url,
            password=PASSWORD,
            ssl_ca_certs=str(certs / "ca.crt"),
            ssl_certfile=str(certs / "client.crt"),
            ssl_keyfile=str(certs / "client.key"),
        )
        try:
            write_session(admin)
        finally:
            admin.close()
        with service(version, **tls, **client_cert) as client:
            assert_reads_the_session(client)
        with service(version, **tls) as client:  # no client certificate: refused
            assert_degraded_not_5xx(client)
    finally:
        server.close()
