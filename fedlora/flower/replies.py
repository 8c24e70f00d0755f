"""Every client reply parsed in one place, strictly, before anything of it is used.

A deployment's clients are other people's machines: a reply may come from a bug, a
flipped bit or an attacker. :func:`parse_reply` turns a reply's records into a typed
:class:`Reply` or says, in one line, why it cannot be one (missing or extra records,
unknown metrics, wrong types, non-finite numbers, a malformed DP ledger, tensor names
that are not adapter keys). Nothing here raises: the server logs the reason with the
node id and the round goes on. Whether the tensors fit what the client was sent (keys,
shapes, finiteness, update norm) is :mod:`fedlora.federation.validation`'s, which knows the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedlora.flower import records
from fedlora.lora import Tensors
from fedlora.privacy.accounting import Step

RECORDS = {records.METRICS, records.ARRAYS, records.PRIVACY, records.PLACEMENT}
METRIC_KEYS = {
    records.PARTITION_ID,
    records.NUM_EXAMPLES,
    records.TRAIN_LOSS,
    records.EPSILON,
    records.REFUSED,
    records.BASE_DIGEST,
    records.ROUND_NONCE,
}
# a secure round's reply: Flower's FitRes records (its parameters emptied by the mod) and its SecAgg+ record
SECURE_RECORDS = {"fitres.metrics", "fitres.num_examples", "fitres.parameters", "fitres.status", "secaggplus_configs"}
IN_THE_MASK = (records.NUM_EXAMPLES, records.TRAIN_LOSS)
LEDGER_KEYS = {"noise", "rate", "steps"}


@dataclass(frozen=True)
class Placement:
    """Where a simulated client ran: its Ray node's address, process, the GPUs Ray gave it, its device."""

    host: str
    pid: int
    gpus: str  # Ray's GPU ids for its actor, comma-separated; empty without
    device: str  # what it trained on (cpu where the GPUs given are only declared)

    def __str__(self) -> str:
        return f"pid {self.pid}{f', GPU {self.gpus}' if self.gpus else ''}, {self.device}"


@dataclass(frozen=True)
class Reply:
    """What one client replied, checked for form (not yet against the round)."""

    partition: int
    node_id: int
    tensors: Tensors | None  # None only when it refused (its DP budget is spent)
    num_examples: int | None = None
    train_loss: float | None = None
    epsilon: float | None = None
    refused: bool = False
    ledger: list[Step] | None = None
    base_digest: int | None = None  # the fingerprint of the base-weight delta D it trained on
    round_nonce: int | None = None  # the round's nonce it echoes
    placement: Placement | None = None  # in a simulation, where it ran (logged)


class Malformed(ValueError):
    """Why a reply cannot be parsed (one line)."""


def parse_reply(m: Message, *, private: bool, secure: bool = False) -> Reply | str:
    """The reply ``m`` as a :class:`Reply`, or why it is malformed. ``private``: the run is DP
    (only then may a reply carry a ledger, an epsilon or a refusal). ``secure``: a SecAgg+ masked
    reply (:mod:`fedlora.flower.secure_client`), whose update, count and loss are in the masked vector
    and must not be in the clear."""
    try:
        return _parse(m, private=private, secure=secure)
    except Malformed as err:
        return f"malformed reply: {err}"
    except Exception as err:  # whatever a crafted record raises, it is a rejection
        return f"malformed reply ({type(err).__name__}: {err})"


def _parse(m: Message, *, private: bool, secure: bool = False) -> Reply:
    content = m.content
    names = set(content.keys())
    if secure:
        names -= SECURE_RECORDS
        if records.ARRAYS in names or any(k in content.get(records.METRICS, {}) for k in IN_THE_MASK):
            raise Malformed("an update, count or loss in the clear in a secure round")
    if extra := sorted(names - RECORDS):
        raise Malformed(f"unexpected record(s) {extra[:3]}")
    metrics = content.get(records.METRICS)
    if not isinstance(metrics, MetricRecord):
        raise Malformed(f"no '{records.METRICS}' metric record")
    if extra := sorted(set(metrics.keys()) - METRIC_KEYS):
        raise Malformed(f"unexpected metric(s) {extra[:3]}")
    if records.PARTITION_ID not in metrics:
        raise Malformed(f"no {records.PARTITION_ID}")
    refused = _integer(metrics, records.REFUSED, default=0) == 1
    epsilon = _number(metrics, records.EPSILON)
    if not private and (refused or epsilon is not None or records.PRIVACY in content):
        raise Malformed("a privacy record or metric in a run without privacy=dp")
    if epsilon is not None and epsilon < 0:
        raise Malformed(f"epsilon is {epsilon}")
    num_examples = _integer(metrics, records.NUM_EXAMPLES)
    if num_examples is not None and num_examples < 1:
        raise Malformed(f"{records.NUM_EXAMPLES} is {num_examples}")
    ledger = _ledger(content[records.PRIVACY]) if records.PRIVACY in content else None
    arrays = content.get(records.ARRAYS)
    if arrays is None and not refused and not secure:
        raise Malformed(f"no '{records.ARRAYS}' record")
    if arrays is not None and not isinstance(arrays, ArrayRecord):
        raise Malformed(f"'{records.ARRAYS}' is not an array record")
    return Reply(
        partition=_integer(metrics, records.PARTITION_ID),
        node_id=m.metadata.src_node_id,
        tensors=records.from_record(arrays) if arrays is not None and not refused else None,
        num_examples=num_examples,
        train_loss=_number(metrics, records.TRAIN_LOSS),
        epsilon=epsilon,
        refused=refused,
        ledger=ledger,
        base_digest=_integer(metrics, records.BASE_DIGEST),
        round_nonce=_integer(metrics, records.ROUND_NONCE),
        placement=_placement(content.get(records.PLACEMENT)),
    )


def _placement(record: object) -> Placement | None:
    """A placement record: short printable strings and a process id (they go into the server log)."""
    if record is None:
        return None
    keys = {records.HOST, records.PID, records.GPUS, records.DEVICE}
    if not isinstance(record, ConfigRecord) or set(record.keys()) != keys:
        raise Malformed(f"the '{records.PLACEMENT}' record is not {sorted(keys)}")
    text = [record[k] for k in (records.HOST, records.GPUS, records.DEVICE)]
    if not all(isinstance(t, str) and len(t) <= 64 and t.isprintable() for t in text) or not text[0]:
        raise Malformed("the placement's host, GPUs or device is not a short printable string")
    pid = record[records.PID]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise Malformed("the placement's pid is not an integer")
    return Placement(host=text[0], pid=pid, gpus=text[1], device=text[2])


def _number(metrics: MetricRecord, key: str) -> float | None:
    if key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"{key} is a {type(value).__name__}, not a number")
    if not math.isfinite(value):
        raise Malformed(f"{key} is {value}")
    return float(value)


def _integer(metrics: MetricRecord, key: str, *, default: int | None = None) -> int | None:
    raw = metrics.get(key)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw  # exactly: through a float, a 62-bit round nonce would lose its last bits
    value = _number(metrics, key)
    if value is None:
        return default
    if value != int(value):
        raise Malformed(f"{key} is {value}, not an integer")
    return int(value)


def _ledger(record: object) -> list[Step]:
    """A DP accountant history: equal-length lists, noise >= 0, rate in (0, 1], whole steps >= 0."""
    if not isinstance(record, ConfigRecord) or set(record.keys()) != LEDGER_KEYS:
        raise Malformed("the privacy record is not a ledger (noise, rate, steps)")
    noise, rate, steps = (list(record[k]) for k in ("noise", "rate", "steps"))
    if not len(noise) == len(rate) == len(steps):
        raise Malformed("the ledger's lists differ in length")
    for s, q, n in zip(noise, rate, steps, strict=True):
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in (s, q, n))
        if not (ok and s >= 0 and 0 < q <= 1 and n >= 0 and n == int(n)):
            raise Malformed(f"a ledger step ({s}, {q}, {n}) is not (noise >= 0, 0 < rate <= 1, whole steps >= 0)")
    return [(float(s), float(q), int(n)) for s, q, n in zip(noise, rate, steps, strict=True)]
