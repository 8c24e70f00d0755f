"""A secure round's transport (:mod:`fedlora.flower.secure`): the grid Flower's SecAgg+ workflow talks to.

Each stage's messages go out and come back as every fedlora round's do
(:func:`fedlora.flower.collect.exchange`); a reply delivered twice is read once; one that is not
well formed for its stage is dropped before the workflow reads it (the workflow then treats its
node as lost, and rebuilds what it must from the others' shares); every message's bytes are counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_public_key

from fedlora.flower.collect import exchange
from fedlora.outputs.metrics import RoundStats

log = logging.getLogger(__name__)


class StageGrid:
    """The grid the workflow talks to: each stage's messages go out and come back as fedlora's rounds'
    do; replies that are not well formed for their stage are dropped; bytes are counted."""

    def __init__(self, grid: Grid, *, stats: RoundStats, timeout: float, straggler_factor: float | None,
                 check_masked) -> None:  # fmt: skip
        self.grid, self.stats, self.timeout = grid, stats, timeout
        self.straggler_factor = straggler_factor
        self.check_masked = check_masked  # (reply) -> None or why a stage-2 reply is refused
        self.sampled: set[int] = set()

    def send_and_receive(self, messages: Sequence[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else ""
        if stage == Stage.SETUP:
            self.sampled = {m.metadata.dst_node_id for m in messages}
        for m in messages:  # the training message itself was counted when it was built: here its stage record
            stage_record = RecordDict({RECORD_KEY_CONFIGS: m.content.config_records[RECORD_KEY_CONFIGS]})
            self.stats.add_down(content_size(stage_record))
        replies = exchange(
            self.grid,
            messages,
            timeout=self.timeout,
            on_progress=None,
            straggler_factor=self.straggler_factor if stage == Stage.COLLECT_MASKED_VECTORS else None,
        )
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        good, seen = [], set()
        for reply in replies:
            self.observe(stage, reply)
            if reply.metadata.reply_to_message_id in seen:  # delivered twice: the workflow would sum it twice
                continue
            seen.add(reply.metadata.reply_to_message_id)
            if reply.has_error():
                good.append(reply)  # the workflow counts it as a dropout
                continue
            self.stats.add_up(content_size(reply.content))
            why = self._malformed(stage, reply, sent_to)
            if why is None:
                good.append(reply)
            else:
                log.warning("secure aggregation, stage %s: dropped node %d's reply: %s", stage,
                            reply.metadata.src_node_id, why)  # fmt: skip
        return good

    def observe(self, stage: str, reply: Message) -> None:
        """Every reply the server receives, in every stage (tests record them here)."""

    def _malformed(self, stage: str, reply: Message, sent_to: dict[str, int]) -> str | None:
        if sent_to.get(reply.metadata.reply_to_message_id) != reply.metadata.src_node_id:
            return "it answers no message sent to its node"
        try:
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            if stage == Stage.SETUP:  # two public keys that parse (the server derives masks from them)
                ok = all(bytes_to_public_key(record[k]) for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2))
            elif stage == Stage.SHARE_KEYS:
                dsts, texts = record[Key.DESTINATION_LIST], record[Key.CIPHERTEXT_LIST]
                ok = len(dsts) == len(texts) and all(isinstance(d, int) for d in dsts)
                ok = ok and all(isinstance(c, bytes) for c in texts)
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                return self.check_masked(reply)
            else:
                nids, shares = record[Key.NODE_ID_LIST], record[Key.SHARE_LIST]
                ok = len(nids) == len(shares) and set(nids) <= self.sampled
                ok = ok and all(isinstance(s, bytes) for s in shares)
        except Exception as err:  # whatever a crafted record raises, it is a dropout, never a failed round
            return f"not a {stage} reply ({type(err).__name__}: {err})"
        return None if ok else f"not a {stage} reply"


def content_size(content: RecordDict) -> tuple[int, int]:
    """(numbers, bytes) of a message's records as sent: an array's elements and bytes; in config records
    (keys, shares, masked vectors) the bytes as they are and 8 per number; 8 per metric."""
    numbers = size = 0
    for name in content:
        for value in content[name].values():
            if hasattr(value, "shape"):  # an Array
                numbers += int(np.prod(value.shape))
                size += len(value.data)
                continue
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, bytes | str):
                    size += len(v)
                    numbers += (len(v) - NPY_HEADER) // 8 if _is_npy(v) else 0  # a masked vector's int64s
                else:
                    size, numbers = size + 8, numbers + 1
    return numbers, size


NPY_HEADER = 128  # numpy's .npy header for a small 1-d array (Flower's ndarray_to_bytes)


def _is_npy(value: bytes | str) -> bool:
    return isinstance(value, bytes) and value[:6] == b"\x93NUMPY"
