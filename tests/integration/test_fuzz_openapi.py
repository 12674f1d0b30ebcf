"""Property-based fuzzing of the OpenAPI schema (schemathesis) against a live server: never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.integration.servers import start_server


@pytest.fixture(scope="module")
def fuzz_server(tiny_hf_dir, tmp_path_factory):
    # Small limits keep each fuzzed request quick: generation of n<=2 images, understanding of <=16 tokens.
    env = {"JANUS_MAX_N": "2", "JANUS_MAX_NEW_TOKENS": "16", "JANUS_REQUEST_TIMEOUT": "30"}
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"), env)
    yield proc
    proc.stop()


def test_no_server_errors(fuzz_server):
    # schemathesis' pytest plugin does not run under this pytest; drive its strategies with hypothesis directly.
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/understand", "/v1/generate", "/v1/chat/completions", "/v1/images/generations"} <= paths
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            response = case.call(timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        run()
