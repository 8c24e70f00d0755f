"""Real Flower simulations (Ray backend) of the tiny model: outputs, accounting, reproducibility.

Where a test repeats one check over strategies or runs, one case goes through Ray and the
others run the same ServerApp and ClientApps in-process (:func:`tests.local_grid.run_in_process`):
the rounds, messages and accounting are the same, without a Ray start per case.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.cli import main
from fedlora.config.compose import compose
from fedlora.federation.schedule import sample_partitions
from strategies import STRATEGIES
from tests.local_grid import run_in_process

pytestmark = pytest.mark.slow

TINY_RUN = [
    "model=tiny",
    "data.synthetic_train=300",
    "data.synthetic_test=64",
    "clients=6",
    "clients_per_round=3",
    "rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "simulation.parallel_clients=1",  # one Ray worker (tests/conftest.py TINY says why)
]


def simulate(overrides: list[str], out: Path, *, ray: bool) -> None:
    """``fedlora simulate`` (Ray), or the same apps in-process."""
    if ray:
        assert main(["simulate", *overrides, f"output_dir={out}"]) == 0
    else:
        run_in_process(compose([*overrides, f"output_dir={out}"])[0])


def rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same 2-round simulation twice (same seed), in this process: on one Ray worker, then on as many
    as the CPUs hold (where clients run is not what they compute)."""
    folders = []
    for name, placement in (("first", []), ("second", ["simulation.parallel_clients=null"])):
        out = tmp_path_factory.mktemp(name)
        assert main(["simulate", *TINY_RUN, *placement, f"output_dir={out}"]) == 0
        folders.append(out)
    return folders[0], folders[1]


def test_a_run_leaves_every_output(two_runs: tuple[Path, Path]) -> None:
    out, _ = two_runs
    for name in ("config.yaml", "run_config.json", "partitions.csv", "metrics.csv", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    table = rows(out)
    assert [r["round"] for r in table] == ["0", "1", "2"]
    assert all(r["test_accuracy"] != "" for r in table)
    for r in table[1:]:
        assert r["replies_expected"] == r["replies_received"] == "3"
        assert float(r["train_loss"]) > 0 and float(r["wall_s"]) > 0


def test_communication_is_counted_from_the_payloads(two_runs: tuple[Path, Path]) -> None:
    out, _ = two_runs
    # FedAvg sends A and B of every adapted module plus the trained head, up and down.
    d, r, layers, targets, labels = 32, 8, 2, 2, 4
    per_client = layers * targets * (d * r + r * d) + (labels * d + labels)
    for row in rows(out)[1:]:
        assert int(row["numbers_up"]) == 3 * per_client
        assert int(row["numbers_down"]) == 3 * per_client
        # float32 data plus one small .npy header per array, as measured on the wire
        assert 4 * 3 * per_client < int(row["bytes_up"]) < 4 * 3 * per_client + 3 * 10 * 256


def test_same_seed_same_result(two_runs: tuple[Path, Path]) -> None:
    first, second = two_runs
    for a, b in zip(rows(first), rows(second), strict=True):
        for column in ("test_accuracy", "test_loss", "train_loss", "bytes_up", "bytes_down"):
            assert a[column] == b[column], column
    ta = load_file(str(first / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(second / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_the_command_runs_as_a_subprocess(tmp_path: Path) -> None:
    fedlora = Path(sys.executable).with_name("fedlora")
    cmd = [str(fedlora) if fedlora.exists() else "fedlora", "simulate", *TINY_RUN, "rounds=1", f"output_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "round 1/1" in done.stdout
    assert len(rows(tmp_path)) == 2


def test_bad_input_from_the_command_line_exits_2_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", "strategy=fedsdv"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: unknown strategy 'fedsdv'; choose from {sorted(STRATEGIES)}"]
    assert "Traceback" not in done.stdout + done.stderr


D, RANK, LAYERS, TARGETS, LABELS = 32, 8, 2, 2, 4  # the tiny model, LoRA on query and value
MODULES = LAYERS * TARGETS
HEAD = LABELS * D + LABELS  # the trained classifier: weight and bias
NPY_HEADER = 128  # bytes of the .npy header Flower's Array carries per tensor


def wire(numbers: int, arrays: int) -> int:
    """Bytes as sent: float32 values plus one .npy header per tensor."""
    return 4 * numbers + NPY_HEADER * arrays


# Per client and round: (numbers, tensors) up; (numbers, tensors) down in round 1.
FORMULAS = {
    "ffa_lora": ((MODULES * D * RANK + HEAD, MODULES + 2), (MODULES * D * RANK + HEAD, MODULES + 2)),
    "fedsvd": ((MODULES * D * RANK + HEAD, MODULES + 2), (MODULES * 2 * D * RANK + HEAD, 2 * MODULES + 2)),
    # RoLoRA: one factor up (B in round 1, A in round 2: both D x r here); both down.
    "rolora": ((MODULES * D * RANK + HEAD, MODULES + 2), (MODULES * 2 * D * RANK + HEAD, 2 * MODULES + 2)),
    # Fed-SB: R up; R down plus, once per node, the fixed A and B.
    "fed_sb": (
        (MODULES * RANK * RANK + HEAD, MODULES + 2),
        (MODULES * (RANK * RANK + 2 * D * RANK) + HEAD, 3 * MODULES + 2),
    ),
}


@pytest.mark.parametrize("strategy", sorted(FORMULAS))
def test_each_exact_strategy_runs_and_sends_what_its_formula_says(strategy: str, tmp_path: Path) -> None:
    simulate([*TINY_RUN, f"strategy={strategy}"], tmp_path, ray=strategy == "fed_sb")
    table = rows(tmp_path)
    (up, up_arrays), (down, down_arrays) = FORMULAS[strategy]
    for row in table[1:]:
        assert row["replies_received"] == "3"
        assert int(row["numbers_up"]) == 3 * up
        assert int(row["bytes_up"]) == 3 * wire(up, up_arrays)
    assert int(table[1]["numbers_down"]) == 3 * down
    assert int(table[1]["bytes_down"]) == 3 * wire(down, down_arrays)
    if strategy == "fed_sb":
        # Round 0: the sampled clients' one-off gradient of every adapted base weight (d_out x d_in).
        assert int(table[0]["numbers_up"]) == 3 * MODULES * D * D
        assert int(table[0]["bytes_up"]) == 3 * wire(MODULES * D * D, MODULES)
        # Round 2 sends A and B only to nodes that did not get them in round 1.
        assert int(table[2]["numbers_down"]) < int(table[1]["numbers_down"])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def sampled(server_round: int) -> list[int]:
    return sample_partitions(list(range(6)), 3, seed=0, server_round=server_round)


def test_flora_stacks_heterogeneous_ranks_and_catches_nodes_up(tmp_path: Path) -> None:
    """Ranks 1, 2, 3 cycled over partitions; every node receives the stacked factors of the rounds it
    has not folded yet (here always fewer numbers than the dense delta)."""
    ranks = [1, 2, 3]
    run = [*TINY_RUN, "rounds=3", "strategy=flora", "strategy.client_ranks=[1,2,3]", "lora.rank=2",
           "train.personal_eval=false"]  # its evaluation messages would catch every node up  # fmt: skip
    assert main(["simulate", *run, f"output_dir={tmp_path}"]) == 0
    table = rows(tmp_path)
    last_seen = {pid: 0 for pid in range(6)}  # the base version each partition holds
    for rnd in (1, 2, 3):
        row, pids = table[rnd], sampled(rnd)
        stacked = [sum(ranks[pid % 3] for pid in sampled(j)) for j in range(1, rnd)]  # rank of each round's fold
        assert int(row["numbers_up"]) == sum(MODULES * ranks[pid % 3] * 2 * D + HEAD for pid in pids)
        catch_up = sum(MODULES * sum(stacked[last_seen[pid] :]) * 2 * D for pid in pids)
        assert all(MODULES * sum(stacked[last_seen[pid] :]) * 2 * D < MODULES * D * D for pid in pids)
        assert int(row["numbers_down"]) == 3 * HEAD + catch_up
        for pid in pids:
            last_seen[pid] = rnd - 1
    assert float(table[3]["test_loss"]) > 0


@pytest.mark.parametrize("strategy", ["flexlora", "hetlora"])
def test_heterogeneous_rank_strategies_send_each_clients_share_and_receive_the_largest_rank(
    strategy: str, tmp_path: Path
) -> None:
    """Ranks 1, 2, 3 cycled over partitions, the model at rank 3: client k sends r_k (d_in + d_out) per weight
    and receives the full rank-3 adapter; FlexLoRA logs what its truncation to rank 3 loses."""
    ranks = [1, 2, 3]
    run = [*TINY_RUN, f"strategy={strategy}", "strategy.client_ranks=[1,2,3]", "lora.rank=2"]
    simulate(run, tmp_path, ray=False)
    table = rows(tmp_path)
    for rnd in (1, 2):
        row = table[rnd]
        assert int(row["numbers_up"]) == sum(MODULES * ranks[pid % 3] * 2 * D + HEAD for pid in sampled(rnd))
        assert int(row["numbers_down"]) == 3 * (MODULES * 3 * 2 * D + HEAD)
        assert (float(row["truncation"]) > 0) if strategy == "flexlora" else "truncation" not in row
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {tuple(v.shape) for k, v in adapter.items() if "lora_A" in k} == {(3, D)}


def test_hetlora_clients_prune_their_ranks_and_keep_them_in_their_node_state(tmp_path: Path) -> None:
    """A penalty so strong that a client's tail is zero after every step: each round it trains, a client
    halves its rank (gamma 0.5; rank 1 has no tail) and remembers it, and the server takes every reply."""
    run = [*TINY_RUN, "rounds=3", "strategy=hetlora", "strategy.client_ranks=[4,2]", "lora.rank=2",
           "strategy.prune_lambda=1e6", "strategy.prune_gamma=0.5"]  # fmt: skip
    simulate(run, tmp_path, ray=False)
    table = rows(tmp_path)
    ranks = {pid: [4, 2][pid % 2] for pid in range(6)}
    for rnd in (1, 2, 3):
        for pid in sampled(rnd):
            ranks[pid] = max(1, ranks[pid] // 2)
        row = table[rnd]
        assert row["replies_rejected"] == "0" and row["replies_received"] == "3"
        assert int(row["numbers_up"]) == sum(MODULES * ranks[pid] * 2 * D + HEAD for pid in sampled(rnd))
    assert ranks[2] == ranks[4] == 1  # 4 -> 2 -> 1: the second halving needs the rank kept from the first
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {tuple(v.shape) for k, v in adapter.items() if "lora_A" in k} == {(4, D)}


@pytest.mark.parametrize("strategy", ["fedex", "flora"])
def test_folding_strategies_send_the_dense_delta_when_it_is_smaller(strategy: str, tmp_path: Path) -> None:
    """At r = 8 a round's factors (rank 24 for FLoRA, 32 for FedEx) outweigh the 32 x 32 delta."""
    run = [*TINY_RUN, f"strategy={strategy}", "train.personal_eval=false"]  # training messages catch up
    assert main(["simulate", *run, f"output_dir={tmp_path}"]) == 0
    table = rows(tmp_path)
    lora_down = MODULES * 2 * D * RANK if strategy == "fedex" else 0  # FLoRA's clients start fresh adapters
    assert int(table[1]["numbers_down"]) == 3 * (HEAD + lora_down)
    assert int(table[2]["numbers_down"]) == 3 * (HEAD + lora_down + MODULES * D * D)
    assert (tmp_path / "adapter" / "model.safetensors").is_file()  # merged: smaller than the stacked LoRA


def test_lora_fair_logs_its_correction_next_to_fedavg(tmp_path: Path) -> None:
    assert main(["simulate", *TINY_RUN, "strategy=lora_fair", "train.lr=0.01", f"output_dir={tmp_path}"]) == 0
    for row in rows(tmp_path)[1:]:
        per_client = MODULES * 2 * D * RANK + HEAD  # as FedAvg: the correction costs no traffic
        assert int(row["numbers_up"]) == int(row["numbers_down"]) == 3 * per_client
        assert 0 < float(row["residual_fedavg"]) < 1
        assert float(row["cosine"]) >= float(row["cosine_fedavg"])


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "fedsvd", "fed_sb", "flora", "lora_fair", "fedex"])
def test_every_strategy_runs_with_dp_sgd_within_its_budget(strategy: str, tmp_path: Path) -> None:
    run = [*TINY_RUN, f"strategy={strategy}", "privacy=dp", "privacy.epsilon=2"]
    simulate(run, tmp_path, ray=strategy == "fed_sb")
    table = rows(tmp_path)
    for row in table[1:]:
        assert row["refused"] == "0" and row["replies_received"] == "3"
        assert 0 < float(row["epsilon_max"]) <= 2.0
        assert row["train_loss"] == ""  # DP clients report no loss on their private batches
    if strategy == "fed_sb":  # the LoRA-SB gradient is a release too: charged before round 1
        assert 0 < float(table[0]["epsilon_max"]) <= 2.0


def test_clients_out_of_budget_refuse_and_are_counted(tmp_path: Path) -> None:
    """80 examples each, sigma 1 at q = 0.1, 2 steps: one round costs epsilon 2.50, two 2.77 > 2.6. All train
    in round 1, then refuse rounds 2 and 3; no reported epsilon exceeds the target."""
    run = [*TINY_RUN, "clients=4", "clients_per_round=4", "rounds=3", "data.synthetic_train=320"]
    run += ["privacy=dp", "privacy.noise_multiplier=1.0", "privacy.epsilon=2.6"]
    assert main(["simulate", *run, f"output_dir={tmp_path}"]) == 0
    table = rows(tmp_path)
    assert [r["refused"] for r in table[1:]] == ["0", "4", "4"]
    assert all(float(r["epsilon_max"]) <= 2.6 for r in table[1:])
    assert float(table[1]["epsilon_max"]) == pytest.approx(2.504, abs=0.01)
    assert table[2]["numbers_up"] == "0" and table[2]["test_accuracy"] == table[1]["test_accuracy"]


def test_dp_runs_draw_private_noise_and_plain_runs_repeat_exactly(tmp_path: Path) -> None:
    """Two DP runs with the same seed differ (the noise is not the seed's); two plain runs are bit-identical
    (``test_same_seed_same_result``); the unsafe switch makes DP runs repeat, and says NOT PRIVATE."""

    def adapter_of(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "adapter" / "adapter_model.safetensors"))

    dp = [*TINY_RUN, "privacy=dp", "privacy.noise_multiplier=1.0"]
    outs = {}
    for name, extra in (("a", []), ("b", []), ("c", ["privacy.unsafe_seeded_randomness=true"]),
                        ("d", ["privacy.unsafe_seeded_randomness=true"])):  # fmt: skip
        outs[name] = tmp_path / name
        simulate([*dp, *extra], outs[name], ray=name == "a")
    a, b, c, d = (adapter_of(outs[n]) for n in "abcd")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert all(r["privacy_warning"].startswith("NOT PRIVATE") for r in rows(outs["c"]))
    assert "privacy_warning" not in rows(outs["a"])[0]


@pytest.mark.parametrize("strategy", ["fedavg", "fedsvd", "fed_sb"])  # ffa_lora: fedsvd without its refine
def test_user_level_dp_runs_within_its_budget_and_releases_no_counts(strategy: str, tmp_path: Path) -> None:
    """privacy=user end to end: epsilon per round, growing and within the budget, the clip in metrics.csv;
    nothing that tells the cohort (counts, bytes, client losses); the plan and the spend in run_config.json.
    Fed-SB initialises from a public calibration file (its clients' gradients would not be covered)."""
    run = [*TINY_RUN, f"strategy={strategy}", "privacy=user", "privacy.epsilon=3", "rounds=3"]
    if strategy == "fed_sb":
        calib = tmp_path / "public.csv"
        calib.write_text("text,label\n" + "goal match team,sports\nrain storm wind,weather\nrecipe chef,food\n" * 4)
        run.append(f"strategy.init_source={calib}")
    simulate(run, tmp_path / "out", ray=strategy == "fedavg")
    table = rows(tmp_path / "out")
    spent = [float(r["epsilon"]) for r in table[1:]]
    assert spent == sorted(spent) and spent[0] > 0 and spent[-1] <= 3.0
    assert all(float(r["clip_norm"]) > 0 for r in table[1:])
    for column in ("train_loss", "replies_expected", "replies_received", "numbers_up", "bytes_up", "bytes_down"):
        assert all(r[column] == "" for r in table[1:]), column
    if strategy == "fedavg":  # through the CLI: run_config.json has the plan and what was spent
        config = json.loads((tmp_path / "out" / "run_config.json").read_text())
        assert config["privacy.plan.delta"] == 1e-5 and config["privacy.plan.epsilon"] <= 3.0
        assert config["privacy.spent.epsilon"] == pytest.approx(spent[-1], rel=1e-5)
