"""docs/openapi.yaml against a real gateway, fuzzed by schemathesis.

Every operation of the document gets requests generated from its schemas
(its examples, boundary cases, and random ones; valid ones, and invalid ones
that the server must refuse), sent with the bearer token of a fresh user;
the admin paths are fuzzed once more with an admin's token. Every answer
must be no 5xx, have a status code and content type the document lists for
the operation and a body that matches the documented schema; a request the
schemas allow must not get 400, one they forbid must not succeed, and an
operation that needs a token must refuse a request without one.
"""
from __future__ import annotations

import os
import zoneinfo
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, ignored_auth, missing_required_header, negative_data_rejection,
    positive_data_acceptance, response_schema_conformance, status_code_conformance, unsupported_method,
)

from tests.harness import register_and_login
from tests.test_push import make_admin

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
CHECKS = [unsupported_method, not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance, ignored_auth, missing_required_header]
# A fixed seed makes a failure reproducible; set NETHERLINK_FUZZ_SEED (and _EXAMPLES) to explore further.
SEED = int(os.environ.get("NETHERLINK_FUZZ_SEED", "20261127"))
EXAMPLES_PER_OPERATION = int(os.environ.get("NETHERLINK_FUZZ_EXAMPLES", "12"))
ADMIN = "^/api/admin/"


# docs/openapi.yaml's own format: the time zone names the server's zoneinfo knows.
schemathesis.openapi.format("iana-time-zone", st.sampled_from(sorted(zoneinfo.available_timezones())))

# Loaded when the module is imported; the gateway's address and the token are given per call.
# (schemathesis.pytest.from_fixture would load it from a fixture, but it sets the node's
# `_nodeid`, which pytest 9.2 no longer has.)
schema = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config.from_dict({
    "seed": SEED,
    # No made-up extra query parameters: the server ignores unknown ones, as clients expect.
    "generation": {"max-examples": EXAMPLES_PER_OPERATION, "database": "none", "allow-extra-parameters": False},
    "phases": {"stateful": {"enabled": False}},
    # A request line over gunicorn's limit (a q far beyond its 200 characters) is refused by the web
    # server itself: 414 is a rejection too.
    "checks": {"negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "406", "409", "414", "415", "422", "428", "429", "5xx"]},
        # An upload's bytes must be of its declared type (a PNG must start like one): no schema can
        # say so, so random bytes under an image type are "valid" to the schema and get 415.
        "positive_data_acceptance": {"expected-statuses": [
            "2xx", "3xx", "401", "403", "404", "409", "415", "429", "5xx"]}},
    "request-timeout": 10,
}))


@schema.hook
def filter_body(context, body):
    """Quiet hours must start and end at different times: a rule between two fields, which JSON
    Schema cannot state (documented in QuietHours' description), so such bodies are not "valid"."""
    quiet = body.get("do_not_disturb") if isinstance(body, dict) else None
    return not (isinstance(quiet, dict) and "start" in quiet and quiet.get("start") == quiet.get("end"))


@schema.hook
def filter_query(context, query):
    """GET /api/users needs `username` or `prefix` (documented in its description): another rule
    between two parameters that OpenAPI cannot state."""
    if context.operation is None or context.operation.path != "/api/users" or not isinstance(query, dict):
        return True
    return "username" in query or "prefix" in query


# Module-scoped: Hypothesis refuses function-scoped fixtures (they would not be reset between cases).
@pytest.fixture(scope="module")
def as_user(cluster):
    user = register_and_login(cluster.gw1.http)
    return {"base_url": cluster.gw1.http, "headers": {"Authorization": f"Bearer {user.token}"}}


@pytest.fixture(scope="module")
def as_admin(cluster, storage):
    admin = register_and_login(cluster.gw1.http)
    make_admin(storage, admin)
    return {"base_url": cluster.gw1.http, "headers": {"Authorization": f"Bearer {admin.token}"},
            "user_id": admin.user_id}


ENDS_THE_SESSION = ("/api/auth/logout", "/api/auth/logout-all")


@schema.exclude(path_regex=ADMIN).parametrize()
def test_every_operation_as_a_user(case, as_user):
    if case.operation.path in ENDS_THE_SESSION:  # a user of its own: the shared user's session stays open
        user = register_and_login(as_user["base_url"])
        as_user = {**as_user, "headers": {"Authorization": f"Bearer {user.token}"}}
    case.call_and_validate(checks=CHECKS, **as_user)


@schema.include(path_regex=ADMIN).parametrize()
def test_the_admin_operations_as_an_admin(case, as_admin):
    valid = case.meta is not None and case.meta.generation.mode.is_positive
    if case.operation.path == "/api/admin/pushes/retry" and valid and isinstance(case.body, dict):
        # A valid bulk retry reopens every matching failed push of the test run: keep it to the
        # admin's own (none), so other tests' push records are left alone. Invalid ones are refused.
        case.body["user_id"] = as_admin["user_id"]
    case.call_and_validate(checks=CHECKS, base_url=as_admin["base_url"], headers=as_admin["headers"])


def test_a_405_names_the_allowed_methods(cluster):
    response = requests.request("TRACE", f"{cluster.gw1.http}/api/groups", timeout=10)
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"
    assert set(response.headers.get("Allow", "").replace(" ", "").split(",")) >= {"GET", "POST"}
