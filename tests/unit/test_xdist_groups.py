"""The deployment tests rely on pytest-xdist's groups (one group's tests run one at a time on one worker:
they are timed against round timeouts and heartbeats). xdist groups a test by appending "@group" to its node
id; a pytest that ignores the rewritten id silently runs a group's tests side by side (pytest 9.2 did)."""

import os

import pytest


def only_under_loadgroup(request) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") is None or not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only a pytest-xdist worker under --dist loadgroup groups tests")


@pytest.mark.xdist_group("groups-check")
def test_a_grouped_test_reaches_the_scheduler_under_its_group(request) -> None:
    only_under_loadgroup(request)
    assert request.node.nodeid.endswith("@groups-check"), request.node.nodeid


@pytest.fixture(scope="module")
def computed_once() -> int:
    return 1


def test_tests_sharing_a_module_fixture_share_a_group(request, computed_once) -> None:
    only_under_loadgroup(request)
    assert request.node.nodeid.endswith("@test_xdist_groups.computed_once"), request.node.nodeid
