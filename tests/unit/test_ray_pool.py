"""The retry policy of the Ray backend that outlives a lost host: which actor failures count against a message.

The pool itself is exercised on a real three-host Ray cluster (tests/deployment/test_ray_cluster.py); here the
backend's parent is made to fail in a given order, so each case is certain rather than a race.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

ray_exceptions = pytest.importorskip("ray.exceptions")


@contextlib.contextmanager
def backend_meeting(monkeypatch: pytest.MonkeyPatch, outcomes: list[object]) -> Iterator[object]:
    """Within: a resilient backend whose every try meets the next of ``outcomes`` (an exception is raised)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedlora.flower.ray_pool import resilient_ray_backend

    tries = iter(outcomes)

    def attempt(self: object, message: object, context: object) -> object:
        outcome = next(tries)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(raybackend.RayBackend, "process_message", attempt)
    with resilient_ray_backend():
        yield object.__new__(raybackend.RayBackend)


def unreachable() -> Exception:
    return ray_exceptions.ActorUnavailableError("its host is gone", None)


def test_a_message_goes_past_every_unreachable_actor_of_a_dead_host(monkeypatch) -> None:
    """A killed host held several actors: a message that meets them one after another still runs."""
    outcomes = [ray_exceptions.ActorDiedError(), unreachable(), unreachable(), "reply"]
    with backend_meeting(monkeypatch, outcomes) as backend:
        assert backend.process_message("message", "context") == "reply"


def test_a_message_under_which_two_actors_died_fails(monkeypatch) -> None:
    outcomes = [ray_exceptions.ActorDiedError(), unreachable(), ray_exceptions.ActorDiedError(), "never"]
    with backend_meeting(monkeypatch, outcomes) as backend, pytest.raises(ray_exceptions.ActorDiedError):
        backend.process_message("message", "context")


def test_other_errors_are_not_retried(monkeypatch) -> None:
    failing = [ValueError("the client app failed"), "never"]
    with backend_meeting(monkeypatch, failing) as backend, pytest.raises(ValueError, match="client app failed"):
        backend.process_message("message", "context")
