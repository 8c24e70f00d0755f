"""Deployment across network namespaces: one host per namespace, real addresses, links cut and restored.

One federation (:mod:`tools.netns`: a switch, the SuperLink at 10.77.0.1, the user
at 10.77.0.2, three SuperNodes at 10.77.0.11-13) is built with docs/deployment.md's
commands and shared by these tests, in order. Cutting a link drops its packets (no
connection is reset), as a pulled cable or a dead route does. Everything is removed at
the end, also when a test fails or the run is interrupted (SIGTERM, SIGHUP, Ctrl-C).
Skipped where namespaces cannot be made (not root, no CAP_NET_ADMIN).
"""

from __future__ import annotations

import math
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from fedlora.config.compose import compose
from fedlora.deploy import setup as deploy
from tests.deployment.test_deployment import assert_same_run, finished, rows
from tests.local_grid import run_in_process
from tools import netns

# One pytest-xdist group: the tests share one federation (a module fixture) at fixed addresses, in order, so
# they run on one worker; tests/deployment/test_deployment.py is another group.
pytestmark = [pytest.mark.slow, pytest.mark.deployment, pytest.mark.xdist_group("netns")]

# train.personal_eval off: a deployed SuperNode starts a ClientApp process per message, and the evaluation
# adds one per node per round (the outage test below keeps it on and checks it)
TINY = [
    "model=tiny",
    "data.synthetic_train=600",
    "data.synthetic_test=200",
    "train.local_steps=4",
    "train.lr=0.005",  # the lr the comparisons' tolerances are sized for: the preset's 0.02 grows rounding to 4e-5
    "train.personal_eval=false",
]
RUN_S = 480  # bound on one run with outages (each costs a round timeout or a reconnection)


def _reason_unavailable() -> str | None:
    try:
        netns.check_available()
    except netns.Unavailable as err:
        return str(err)
    return None


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    reason = _reason_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    federation = netns.NetnsFederation(tmp_path_factory.mktemp("netns"))

    def on_signal(signum, frame):  # a killed test run removes its network too
        federation.down()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        federation.up()
        yield federation
    finally:
        federation.down()
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert not [n for n in netns.ip("netns", "list").stdout.split() if n.startswith(federation.id)]


def wait(predicate, *, timeout: float, what: str, fed: netns.NetnsFederation | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    logs = "" if fed is None else "\n".join(f"== {n}\n{fed.text(n)[-3000:]}" for n in fed.pids)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s\n{logs}")


def table(out: Path) -> list[dict[str, str]]:
    return rows(out) if (out / "metrics.csv").exists() else []


def server_log(out: Path) -> str:
    return (out / "server.log").read_text() if (out / "server.log").exists() else ""


# -- 1. the run equals the simulation, through a SuperLink outage -----------------------------------------
# Flower 1.41 declares a node offline 2 x 30 s after its last heartbeat; heartbeats go every 21.6-26.4 s
# and a failed one is retried with jittered exponential backoff (1, 2, 4, ... s). An outage of OUTAGE_S
# starting up to 26.4 s after a node's last heartbeat ends, with the retry that follows it (at most about
# OUTAGE_S later, plus a 5 s call timeout), before 60 s have passed: every node stays online, so the run
# must equal the simulation. A 35 s outage could outlast that (a node declared unavailable mid-round).
OUTAGE_S = 12


def test_namespaced_run_survives_a_superlink_outage_and_equals_the_simulation(fed, tmp_path) -> None:
    run = [*TINY, "clients=3", "clients_per_round=3", "rounds=2", "server.round_timeout=240"]
    # FedSA-LoRA with the personalised evaluation: each node's B lives in its SuperNode's state between the
    # ClientApp processes of its messages; a lost B would change its personalised accuracy against the reference
    run += ["strategy=fedsa_lora", "train.personal_eval=true"]
    out = tmp_path / "deployed"
    fed.submit([*run, f"output_dir={out}"])
    wait(lambda: len(table(out)) >= 2, timeout=RUN_S, what="round 1", fed=fed)
    fed.cut(netns.LINK)  # round 2's messages are waiting on the SuperLink; no node reaches it
    time.sleep(OUTAGE_S)
    fed.restore(netns.LINK)
    wait(lambda: finished(out, 2), timeout=RUN_S, what="the run after the outage", fed=fed)
    for r in table(out)[1:]:
        assert (r["replies_expected"], r["replies_received"], r["replies_rejected"]) == ("3", "3", "0"), r
    cfg, _ = compose([*run, f"output_dir={tmp_path / 'reference'}"])
    reference = run_in_process(cfg)
    assert_same_run(out, reference)  # nothing lost, nothing changed: TLS + auth, three hosts
    for got, want in zip(table(out), table(reference), strict=True):  # every node evaluated its own model
        assert got["personal_accuracy"] and math.isclose(
            float(got["personal_accuracy"]), float(want["personal_accuracy"]), abs_tol=1e-4
        ), (got, want)


# -- 2. certificates name the address the nodes dial --------------------------------------------------
def test_a_certificate_for_another_address_is_refused(fed, tmp_path) -> None:
    """A SuperLink on the user's host (10.77.0.2) whose certificate, from the same CA, names
    other addresses: a node that trusts the CA and dials 10.77.0.2 refuses it by name."""
    wrong = tmp_path / "wrong-certs"
    wrong.mkdir()
    for name in (deploy.CA_CERT, deploy.CA_KEY):
        shutil.copy(fed.certs / name, wrong / name)
    deploy.make_certificates(wrong, hosts=["10.77.0.99", "127.0.0.1"])
    user = fed.hosts[netns.USER].address
    fed.start(netns.USER, fed.deploy("superlink", "--certs", str(wrong), "--host", user, "--port", "8000"),
              name="wrong-superlink")  # fmt: skip
    fed.wait_for_port("node-0", user, 8000, timeout=60)
    args = ["--superlink", f"{user}:8000", "--ca", str(fed.certs / deploy.CA_CERT), "--key", str(fed.certs / "node-0"),
            "--partition-id", "0", "--port", "9095", "--max-retries", "1"]  # fmt: skip
    fed.start("node-0", fed.deploy("supernode", *args), name="misdialled-node")
    text = lambda: fed.text("misdialled-node")  # noqa: E731
    wait(lambda: "CERTIFICATE_VERIFY_FAILED" in text(), timeout=120, what="the refusal", fed=fed)
    assert re.search(r"IP address mismatch|doesn't match|hostname mismatch", text()), text()[-2000:]
    assert "SuperNode ID" not in text()
    fed.stop("misdialled-node")
    fed.stop("wrong-superlink")
    # The right certificate connects: the federation's own nodes, dialling 10.77.0.1 (test 1 ran on them).
    assert "Connection successful" in fed.text("node-0") or "SuperNode ID" in fed.text("node-0")


# -- 3. a node unreachable from the start, and a node's link cut mid-round (FLoRA: base weights catch up) ---
def test_missing_and_cut_nodes_rejoin_and_catch_up_on_their_base_weights(fed, tmp_path) -> None:
    fed.stop("node-2")
    fed.cut("node-2")
    fed.start_node(2)  # up, but behind a dead link: it never reaches the SuperLink
    out = tmp_path / "flora"
    fed.submit([*TINY, "strategy=flora", "clients=3", "clients_per_round=3", "rounds=5", "server.round_timeout=60",
                "server.node_timeout=20", "server.min_nodes=2", f"output_dir={out}"])  # fmt: skip
    wait(lambda: "have no node after server.node_timeout" in server_log(out), timeout=RUN_S, what="the start",
         fed=fed)  # fmt: skip
    fed.restore("node-2")  # the run goes on without it; it joins once it reaches the SuperLink
    joined = wait(lambda: re.search(r"round (\d+): partition 2 joined the run", server_log(out)), timeout=RUN_S,
                  what="partition 2 to join", fed=fed)  # fmt: skip
    cut_round = int(joined.group(1))  # node-1 has taken part in every round so far: cut it once it holds this one's
    wait(lambda: fed.text("node-1").count("Receiving: train message") >= cut_round, timeout=RUN_S,
         what=f"round {cut_round} to reach node-1", fed=fed)  # fmt: skip
    fed.cut("node-1")
    wait(lambda: len(table(out)) > cut_round, timeout=RUN_S, what=f"round {cut_round} without node-1", fed=fed)
    fed.restore("node-1")
    wait(lambda: (out / "adapter").is_dir() and len(table(out)) == 6, timeout=RUN_S, what="the run", fed=fed)

    log, metrics = server_log(out), table(out)
    first_joined = int(joined.group(1))
    assert "partition(s) [2] have no node after server.node_timeout=20 s: starting with 2 of 3 nodes" in log, log
    for r in metrics[1:first_joined]:  # before it joined: the round went on with the two others
        assert (r["replies_expected"], r["replies_received"]) == ("3", "2"), r
    assert re.search(rf"round {first_joined}: partition 2 catches up on base weights: version unknown -> \d", log)
    # Its reply is lost with the link: silence until the round's timeout, the message's TTL running out,
    # or the SuperLink declaring the node unavailable after two missed heartbeats, whichever comes first.
    lost = rf"round {cut_round}: partition(\(s\) \[1\] did not reply| 1 failed: .*(expired|Node Unavailable))"
    assert re.search(lost, log), log
    assert metrics[cut_round]["replies_received"] == "2", metrics[cut_round]
    # Back after the cut: node-1 gets what it missed and its reply is accepted. Every accepted reply
    # carries the digest of the base weights it trained on, equal to the server's (and so to the others').
    assert re.search(r"round (\d+): partition 1 catches up on base weights: version unknown -> \d", log), log
    full = [int(r["round"]) for r in metrics[1:] if r["replies_received"] == "3" and r["replies_rejected"] == "0"]
    assert [r for r in full if r > cut_round], (cut_round, metrics)
    assert "other base weights" not in log


# -- 4. the docs' commands are the ones this harness runs ----------------------------------------------------
def test_the_deployment_docs_use_the_commands_this_harness_checks(fed, tmp_path) -> None:
    """Every ``fedlora deploy`` step of docs/deployment.md, with its flags, is one this harness runs (``--data-path``
    and ``--stream`` are optional there and left out here: the nodes share the run's data; runs are watched).
    The federation's start ran the setup steps; a run is submitted here when no test before this one did, so that
    the test holds alone and in any order."""
    if "run" not in fed.used:
        out = tmp_path / "docs-run"
        fed.submit([*TINY, "clients=3", "clients_per_round=3", "rounds=1", f"output_dir={out}"])
        wait(lambda: finished(out, 1), timeout=RUN_S, what="a one-round run", fed=fed)
    text = (netns.ROOT / "docs" / "deployment.md").read_text().replace("\\\n", " ")  # continued lines
    documented: dict[str, set[str]] = {}
    for line in re.findall(r"^\s*fedlora deploy ([a-z]+)(.*?)(?:#.*)?$", text, flags=re.M):
        step, rest = line
        flags = set(re.findall(r"(--[a-z-]+)", rest)) - {"--data-path", "--stream"}
        documented.setdefault(step, set()).update(flags)
    assert {"certs", "superlink", "connection", "register", "supernode", "run"} <= set(documented), documented
    for step, flags in documented.items():
        assert step in fed.used, step
        assert flags <= fed.used[step], (step, flags - fed.used[step])
