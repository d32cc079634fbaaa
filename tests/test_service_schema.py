"""Property-based API test (schemathesis): generated valid and invalid requests to every
endpoint of the ASGI app with default settings (plus an admin token, so the admin endpoint
exists) never get a 5xx, and 2xx answers match the OpenAPI response schemas.  Real Redis,
real tower and index (the tiny export)."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from service_fixtures import TINY_MODEL_VERSION, build_version

from service.app import create_app
from service.settings import Settings

TOKEN = "schema-token"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory, redis_server: str):
    root = tmp_path_factory.mktemp("schema")
    artifacts, index = build_version(root, TINY_MODEL_VERSION, index_version="idx-schema")
    settings = Settings(
        artifacts_dir=artifacts,
        index_dir=index,
        redis_url=redis_server,
        redis_prefix="t2schema",
        admin_token=TOKEN,
        watch_interval_s=0,
    )
    # schemathesis runs the app's lifespan itself (loading the engine, the Redis pool).
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))


# Examples per operation and mode: 7 operations x 2 modes x 25 stays well under a minute.
MAX_EXAMPLES = 25


def make_check(operation, mode: GenerationMode, headers: dict[str, str] | None):
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api_schema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/recall", "/events", "/admin/reload"}
    for operation in operations:
        admin = operation.path.startswith("/admin")
        headers = {"Authorization": f"Bearer {TOKEN}"} if admin else None
        try:
            make_check(operation, mode, headers)()
        except hypothesis.errors.Unsatisfiable:
            # No parameter to make invalid (GET /healthz in negative mode): nothing to test.
            assert mode is GenerationMode.NEGATIVE
