"""Aggregation strategies for federated LoRA: one file each, pure tensor math.

``STRATEGIES`` maps the config name (``strategy=<name>``) to the class.
"""

from __future__ import annotations

from strategies.base import Strategy, StrategyConfig
from strategies.fed_sb import FedSB
from strategies.fedavg import FedAvg
from strategies.fedex import FedEx
from strategies.fedsa_lora import FedSALora
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALora
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.lora_fair import LoraFair
from strategies.rolora import RoLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FFALora, FedSVD, FedSB, FLoRA, LoraFair, FedEx, RoLoRA, FlexLoRA, HetLoRA, FedSALora)
}


def get_strategy_class(name: str) -> type[Strategy]:
    """The registered class for ``name``; a miss names every choice."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "Strategy", "StrategyConfig", "get_strategy_class"]
