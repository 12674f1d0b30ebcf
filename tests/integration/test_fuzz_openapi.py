"""schemathesis against a live server with every check (`--checks all`): the OpenAPI document tells
the truth about what each route accepts (positive data accepted, negative data refused), the status
codes, content types and headers it returns (405 with `Allow`), and the server never answers 5xx.

Two runs of the real CLI (its pytest plugin does not load under this pytest):
- with `tests/support/schemathesis_hooks.py`, which puts real images into generated requests,
  so the understanding success path is fuzzed too;
- without it, so undecodable images must be refused with a documented 4xx (the check that
  schema-valid data is accepted is left out: no schema can say "a decodable image").
Two checks are left out for the conversation routes and one for plain completions, with the reasons
where they are.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import start_server

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fuzz_server(tiny_hf_dir, tmp_path_factory):
    # Small limits keep each fuzzed request quick: generation of n<=2 images, understanding of <=16 tokens.
    env = {"JANUS_MAX_N": "2", "JANUS_MAX_NEW_TOKENS": "16", "JANUS_REQUEST_TIMEOUT": "30",
           "JANUS_LOG_LEVEL": "warning"}
    proc = start_server(["serve", "--model", str(tiny_hf_dir)], tmp_path_factory.mktemp("logs"), env)
    yield proc
    proc.stop()


def schemathesis(url: str, *args: str, hooks: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1"}
    env.pop("SCHEMATHESIS_HOOKS", None)
    if hooks:
        env["SCHEMATHESIS_HOOKS"] = "tests.support.schemathesis_hooks"
    cli = Path(sys.executable).with_name("schemathesis")
    done = subprocess.run([str(cli), "run", url + "/openapi.json", "--checks", "all", "--max-examples", "3",
                           "--seed", "16", "--request-timeout", "60", "--no-color", "--output-sanitize", "false",
                           *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=540, check=False)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-6000:]
    assert re.search(r"Operations:\s+[1-9]\d* selected", report), report[-2000:]  # not "API Links: 0 ..."


def test_every_route_is_documented(fuzz_server):
    import httpx

    doc = httpx.get(fuzz_server.url + "/openapi.json").json()
    assert {"/v1/understand", "/v1/generate", "/v1/chat/completions", "/v1/images/generations", "/health",
            "/ready", "/metrics", "/v1/models"} <= set(doc["paths"])
    understand = doc["paths"]["/v1/understand"]["post"]
    assert set(understand["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(understand["responses"])
    assert "text/event-stream" in understand["responses"]["200"]["content"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    images = doc["components"]["schemas"]["ImagesGenerationsBody"]["properties"]
    assert images["response_format"]["enum"] == ["b64_json"] and images["n"]["maximum"] == 2
    r = httpx.request("TRACE", fuzz_server.url + "/v1/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


CONVERSATIONS = "^/v1/(understand|chat/completions)$"
COMPLETIONS = "^/v1/completions$"


def test_schemathesis_with_real_images_finds_nothing(fuzz_server):
    schemathesis(fuzz_server.url, "--exclude-path-regex", "^/v1/(understand|chat/completions|completions)$",
                 hooks=True)
    # Plain completions, with every check but one: schema-valid data accepted. Token ids must lie in the
    # model's vocabulary and not be its image placeholder, and min_tokens may not exceed max_tokens: each
    # a 400 naming it, beyond what the document can say.
    schemathesis(fuzz_server.url, "--include-path-regex", COMPLETIONS, "--exclude-checks",
                 "positive_data_acceptance", hooks=False)
    # The two routes that take conversations are fuzzed with real images too, with every check but two:
    # - schema-valid data accepted: a conversation's rules (system turns first, the last turn from the
    #   user, images only in user turns and at most max_images in all) are beyond JSON Schema; each
    #   broken rule is a 400 whose message names it;
    # - schema-invalid data refused: multipart form fields are text on the wire, so a negative case
    #   that only changes a field's JSON type ("16" for 16) reaches the server unchanged.
    schemathesis(fuzz_server.url, "--include-path-regex", CONVERSATIONS, "--exclude-checks",
                 "positive_data_acceptance,negative_data_rejection", hooks=True)


def test_schemathesis_with_fuzzed_images_finds_nothing(fuzz_server):
    # Only the routes that take images; undecodable ones must get a documented 4xx, never a 5xx.
    schemathesis(fuzz_server.url, "--exclude-checks", "positive_data_acceptance,negative_data_rejection",
                 "--include-path-regex", CONVERSATIONS, hooks=False)
