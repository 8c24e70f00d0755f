"""What is task-specific, behind one small typed interface (:class:`Task`) and a registry (:data:`TASKS`).

``task=classification`` (:class:`~fedlora.learning.classification.SequenceClassification`, encoder +
head) and ``task=causal_lm`` (:class:`~fedlora.learning.causal_lm.CausalLM`, instruction tuning)
implement it; the client, the server and the strategies do not know which runs. A new task is a class
with these methods and one line in :data:`TASKS` (a test checks the names against the config's).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from fedlora.config.errors import ConfigError
from fedlora.learning.causal_lm import CausalLM
from fedlora.learning.classification import SequenceClassification


@runtime_checkable
class Task(Protocol):
    """Model class, head, tokenisation, batches, loss and metric of one kind of fine-tuning."""

    name: ClassVar[str]
    metric_columns: ClassVar[tuple[str, ...]]  # metrics.csv columns beyond accuracy and loss
    peft_task_type: ClassVar[str]  # the exported adapter's peft task type

    def build(self, path: str, *, labels: tuple[str, ...], pretrained: bool, architecture: dict[str, Any]) -> nn.Module:
        """The base model (pretrained, or a random init of ``path``'s config), with a head for ``labels``."""
        ...

    def heads(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s head modules, trained in full (peft's modules_to_save)."""
        ...

    def prepare_tokenizer(self, tokenizer: Any) -> Any: ...

    def check_room(self, tokenizer: Any, *, labels: tuple[str, ...], max_len: int) -> None:
        """Refuse (ConfigError) a ``max_len`` that leaves no room for what the task must keep."""
        ...

    def tokenize(self, data: Any, tokenizer: Any, *, max_len: int, labels: tuple[str, ...] = ()) -> Any: ...

    def collate(self, tokenizer: Any) -> Any:
        """A batch's rows -> padded tensors."""
        ...

    def criterion(self) -> nn.Module:
        """The loss on (logits, labels), mean over the batch (Opacus's ghost clipping wraps it)."""
        ...

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], criterion: nn.Module | None = None
    ) -> torch.Tensor: ...

    def evaluation_data(
        self, data: Any, tokenizer: Any, *, max_len: int, labels: tuple[str, ...], batch_size: int
    ) -> Any: ...

    def evaluate(
        self, model: nn.Module, data: Any, device: torch.device, *, accuracy_only: bool = False
    ) -> dict[str, float]:
        """``accuracy`` (where the task has labels), ``loss`` and the ``metric_columns``; ``accuracy_only``:
        what personalised evaluation reports, accuracy and loss (a causal LM skips its generation then)."""
        ...


TASKS: dict[str, type[Task]] = {task.name: task for task in (SequenceClassification, CausalLM)}


def task_for(name: str) -> Task:
    """The task object of ``task=<name>``."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]()
