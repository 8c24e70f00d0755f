"""FedAvg on LoRA (McMahan et al., AISTATS 2017, applied to the LoRA factors).

A and B are averaged separately, each weighted by p_k. This is inexact: in general
sum_k p_k B_k A_k - B_bar A_bar = sum_k p_k (B_k - B_bar)(A_k - A_bar) != 0,
which is the error the exact strategies remove.
"""

from __future__ import annotations

from strategies.base import Strategy


class FedAvg(Strategy):
    """Example-weighted mean of every tensor the clients send (the interface's default ``aggregate``):
    B_bar = sum_k p_k B_k, A_bar = sum_k p_k A_k, and dense modules alike.

    User-level DP (``privacy=user``): each client's update (A_k - A, B_k - B, the head's) is
    clipped to C as one vector; adding or removing a client moves their sum by at most C.
    """

    name = "fedavg"
