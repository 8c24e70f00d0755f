"""Base weights that change during a run (FLoRA, FedEx): the server's log and nodes' catch-up.

A folding strategy gives, each round, low-rank factors (A_f, B_f per adapted module)
whose product s B_f A_f joins the base weights of every model: W = W0 + D, with D
the sum over the rounds so far. The number of rounds folded is D's *version*.

The server keeps D and a :class:`FoldLog` of the recent factors; a node keeps its
own D and version (the Flower side puts them in the node's ``context.state``). A node
at version v, sampled at version n, receives the factors of the rounds it has not
folded (v+1..n), and folds them in order; when those factors together hold more
numbers than D (many missed rounds, or many clients per round), or when the server
does not know the node's version (a failure, a restart), it receives D itself.

Why catch-up and not D every round: D has d_out x d_in numbers per adapted weight,
while a FLoRA round adds K r (d_out + d_in) (K replies, rank r), about 5x fewer
for MiniLM at K = 5, r = 8; a node that takes part in most rounds pays only for the
rounds it missed. The cost is that a node stores D (d_out x d_in per adapted weight).

Every node ends bit-identical to the server, whichever path it took: all folds go
through :func:`fedlora.lora.fold` (one float64 product, rounded once) in round
order, and the dense path copies the server's D.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.lora import Tensors, fold


def numbers(tensors: Tensors) -> int:
    return sum(v.numel() for v in tensors.values())


@dataclass
class FoldUpdate:
    """What a node needs to reach version ``end``: ``entries`` to fold on top of version
    ``start`` (``start=0``: on top of nothing), or ``dense``, the server's D at ``end``."""

    start: int
    end: int
    entries: list[Tensors] = field(default_factory=list)
    dense: Tensors | None = None

    @property
    def numbers(self) -> int:
        return numbers(self.dense) if self.dense is not None else sum(numbers(e) for e in self.entries)


class StaleBase(RuntimeError):
    """A node's D is not the version the server's update starts from."""


class FoldLog:
    """The server's D, and the factors of the latest rounds that a catch-up may still send."""

    def __init__(self, *, scaling: float) -> None:
        self.scaling = scaling
        self.delta: Tensors = {}
        self.entries: list[Tensors] = []
        self.first = 0  # the version entries[0] starts from

    def restore(self, delta: Tensors, version: int) -> None:
        """Continue from a checkpoint's D at ``version`` (no catch-up entries: nodes get D)."""
        self.delta, self.entries, self.first = dict(delta), [], version

    @property
    def version(self) -> int:
        return self.first + len(self.entries)

    def append(self, factors: Tensors) -> None:
        """Fold one round's factors into D and keep them for catch-ups."""
        self.delta = fold(self.delta, factors, scaling=self.scaling)
        self.entries.append(factors)
        # An entry that only the node at version `first` would need, with a catch-up
        # larger than D anyway, will never be sent: drop it.
        dense = numbers(self.delta)
        while self.entries and sum(map(numbers, self.entries)) >= dense:
            self.entries.pop(0)
            self.first += 1

    def update_for(self, held: int | None) -> FoldUpdate:
        """The smaller of catch-up and D for a node at version ``held`` (None: unknown)."""
        end = self.version
        start = 0 if held is None else held
        if not 0 <= start <= end:
            raise ValueError(f"a node at version {held} is ahead of the server's {end}")
        if start == end and held is not None:
            return FoldUpdate(start, end)
        if start >= self.first:
            update = FoldUpdate(start, end, entries=self.entries[start - self.first :])
            if update.numbers < numbers(self.delta) or end == 0:
                return update
        return FoldUpdate(start, end, dense=self.delta)

    def all_factors(self) -> list[Tensors] | None:
        """Every round's factors since the start, or None when early ones were dropped (D is smaller)."""
        return list(self.entries) if self.first == 0 else None


def catch_up(held: Tensors, version: int, update: FoldUpdate, *, scaling: float) -> Tensors:
    """A node's D at ``update.end``, from its D at ``version``; :class:`StaleBase` if they do not fit."""
    if update.dense is not None:
        return dict(update.dense)
    if update.start == 0:
        held = {}
    elif update.start != version:
        raise StaleBase(f"this node's base weights are at version {version}, the update starts at {update.start}")
    for entry in update.entries:
        held = fold(held, entry, scaling=scaling)
    return held
