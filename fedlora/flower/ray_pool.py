"""Flower's Ray backend, made to outlive a lost Ray node: its dead actors leave the pool, their messages go on.

Flower's simulation engine runs each message on an actor from a pool sized to the
cluster when the run starts. When a Ray node dies (a worker host killed, its raylet
gone), its actors die with it, but Flower's pool takes them back after the error:
every later round some messages land on a dead actor and fail at once, so a run
on a cluster that lost one host of two keeps losing clients in every round. Here
(:func:`resilient_ray_backend`, around one simulation):

- an actor whose call raised Ray's actor error (died, or unreachable) is killed
  and never returned to the pool: the pool shrinks to the actors that still live;
- the message it was running is run again on a live actor: the node's context is
  the driver's and unchanged (the dead actor never returned one), so the client
  trains from the same state as it would have, and the round is the same. An actor
  that was unreachable (Ray's ``ActorUnavailableError``: its host is gone or cut off)
  says nothing of the message, so the message goes on to the next actor (each such
  actor leaves the pool, so this ends); an actor that died under it counts, and a
  message under which two died fails, not the pool (it may be the cause). Met in a
  CI run: a killed host held two actors, a message met both, and with "two actors
  at most" its client was lost for the round;
- a thread that finds no idle actor waits for one instead of failing the message
  (the engine keeps a thread per actor of the original pool); with no actor left
  at all the message fails with one clear reason.

Flower's own classes are subclassed and put in place of its module attributes for
the duration of the run (Flower looks them up when the simulation starts); nothing
else of Flower changes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)
DEATHS = 2  # a message under which two actors died fails: one that kills every actor it meets fails, not the pool


class NoActorLeft(RuntimeError):
    """Every actor of the pool died (every Ray node that ran clients is gone)."""


@contextlib.contextmanager
def resilient_ray_backend() -> Iterator[None]:
    """Within: Flower's simulation engine uses :class:`ResilientActorPool` and retries a message whose
    actor died (see the module's docstring)."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    from fedlora.flower.engine import replaced

    class ResilientActorPool(BasicActorPool):
        """Flower's pool, less the actors that died; a submit waits for an idle actor."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.idle = threading.Condition()
            self.lost = 0

        def add_actors_to_pool(self, num_actors: int) -> None:
            with self.idle:
                super().add_actors_to_pool(num_actors)
                self.idle.notify_all()

        def submit(self, actor_fn: Any, job: Any) -> Any:
            with self.idle:
                self.idle.wait_for(lambda: self.pool or self.num_actors == 0)
                if not self.pool:
                    raise NoActorLeft("every Ray actor of the simulation died (its Ray nodes are gone)")
                return super().submit(actor_fn, job)

        def add_actor_back_to_pool(self, future: Any) -> None:
            with self.idle:
                if future in self._future_to_actor:  # a dead actor's future is gone already
                    super().add_actor_back_to_pool(future)
                    self.idle.notify()

        def fetch_result_and_return_actor_to_pool(self, future: Any) -> Any:
            try:
                return super().fetch_result_and_return_actor_to_pool(future)
            except ray.exceptions.RayActorError:
                self.drop(future)
                raise

        def drop(self, future: Any) -> None:
            """The actor that ran ``future`` is dead or unreachable: out of the pool for good."""
            with self.idle:
                actor = self._future_to_actor.pop(future, None)
                self.num_actors -= 1
                self.lost += 1
                self.idle.notify_all()  # threads waiting on an empty pool re-check whether any actor is left
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)  # unreachable, not dead: free its resources
            log.warning("a Ray actor was lost (%d so far, %d left); its message runs again on another",
                        self.lost, self.num_actors)  # fmt: skip

    class ResilientRayBackend(raybackend.RayBackend):
        """Flower's Ray backend; a message whose actor died runs again on a live one."""

        def process_message(self, message: Any, context: Any) -> Any:
            deaths = 0
            while True:  # ends: every failed actor left the pool, and an empty pool raises NoActorLeft
                try:
                    return super().process_message(message, context)
                except ray.exceptions.ActorUnavailableError:
                    continue  # unreachable, not killed by this message: try the next actor
                except ray.exceptions.RayActorError:
                    deaths += 1
                    if deaths == DEATHS:
                        raise  # it took two actors down: the message itself may be the cause

    with replaced(raybackend, BasicActorPool=ResilientActorPool, RayBackend=ResilientRayBackend):
        yield
