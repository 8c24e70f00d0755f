"""The pieces a deployment is made of, without processes: run config mapping, reply checks,
certificates and command lines, resumable checkpoints, node-local labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tomli as tomllib
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import flatten_dict, parse_config_args

from fedlora.cli import main
from fedlora.config.app import app_defaults, from_run_config, run_config_for, to_overrides, toml_section
from fedlora.config.compose import compose
from fedlora.config.run import ConfigError
from fedlora.deploy import setup as deploy
from fedlora.federation.validation import reject_reason, update_norm
from fedlora.learning.data import load_splits
from fedlora.learning.worker import Worker
from fedlora.lora import AdapterKey, Role
from fedlora.outputs.checkpoint import load_checkpoint_meta, save_checkpoint
from fedlora.outputs.metrics import MetricsLog, read_metrics

ROOT = Path(__file__).resolve().parents[2]


# -- the App's run config ----------------------------------------------------------------
def test_pyproject_run_config_is_the_app_defaults() -> None:
    section = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert flatten_dict(section) == app_defaults()
    assert flatten_dict(tomllib.loads(toml_section())["tool"]["flwr"]["app"]["config"]) == app_defaults()


def test_app_defaults_compose_to_the_hydra_defaults() -> None:
    hydra, _ = compose([])
    assert from_run_config(app_defaults()).to_flat() == hydra.to_flat()


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=fed_sb", "model=tiny", "rounds=2"],
        ["strategy=ffa_lora", "strategy.alpha=32", "train.lr=5e-3"],
        ["strategy=flora", "strategy.client_ranks=[2,4,8]", "lora.target_modules=[query]"],
        ["privacy=dp", "privacy.epsilon=2", "server.max_update_norm=3.5", "output_dir=/tmp/a b"],
        ["partition=dirichlet", "partition.alpha=0.1", "clients=100", "clients_per_round=10"],
        # SST-2's tab delimiter, and strings Hydra would misread if quoted with JSON escapes
        ["data=sst2", "data.path=../shared/data/sst2"],
        ["data=files", 'data.path="C:\\runs\\x\\\\"', "data.text_column='a \"b\" c'", "output_dir=/tmp/x\\y"],
    ],
)
def test_run_config_round_trips_hydra_overrides(overrides) -> None:
    cfg, _ = compose(overrides)
    run_config = run_config_for(cfg)
    assert set(run_config) <= set(app_defaults())
    assert from_run_config(app_defaults() | run_config).to_flat() == cfg.to_flat()


def test_flwr_cli_overrides_reach_the_config() -> None:
    """What `flwr run . --run-config '...'` fuses onto the defaults composes as the Hydra overrides would."""
    flat = parse_config_args(['strategy.name="fedsvd" rounds=5 train.lr=0.005 model.name="tiny"'])
    cfg = from_run_config(app_defaults() | flat)
    want, _ = compose(["strategy=fedsvd", "rounds=5", "train.lr=0.005", "model=tiny"])
    assert cfg.to_flat() == want.to_flat()


def test_bad_run_config_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="unknown run config key"):
        to_overrides({"not.a.key": 1})
    with pytest.raises(ConfigError, match=r"strategy\.alpha"):
        from_run_config(app_defaults() | {"strategy.alpha": 32.0})  # fedavg has no alpha
    with pytest.raises(ConfigError, match="cannot carry"):  # "" is the preset's value: null cannot be asked for
        run_config_for(compose(["data=sst2", "data.path=x", "data.delimiter=null"])[0])


@pytest.mark.parametrize(
    "overrides",
    [["model=tiny", "train.batch_size=16"], ["model=tiny", "model.pretrained=true"],
     ["model=smollm2", "train.lr_schedule=constant", "lora.target_modules=[q_proj]"], ["model=tiny"], [],
     ["model=tiny", "strategy=fed_sb", "privacy=user", "privacy.epsilon=3", "strategy.init_source=CALIBRATION"]],
    ids=str,
)  # fmt: skip
def test_a_value_a_preset_changes_can_be_set_back_through_the_run_config(overrides: list[str], tmp_path) -> None:
    """Flower fuses a run config onto the App's defaults, so a key some preset sets defaults to "" (the preset's):
    the tiny preset's batch of 32 set back to 16 stays 16, where a default of 16 would have been taken for none."""
    cfg, _ = compose([o.replace("CALIBRATION", str(tmp_path / "public.csv")) for o in overrides])
    carried = run_config_for(cfg)
    assert from_run_config(app_defaults() | carried).to_flat() == cfg.to_flat()
    # only what was set (a strategy whose settings alone are refused writes its own keys: Fed-SB at user level)
    assert all(k.endswith(".name") or k in ("train.batch_size", "model.pretrained", "train.lr_schedule",
                                            "lora.target_modules", "privacy.epsilon")
               or (k.startswith("strategy.") and "privacy=user" in overrides) for k in carried)  # fmt: skip
    as_typed = parse_config_args([deploy.run_config_arg(carried)]) if carried else {}
    assert from_run_config(app_defaults() | as_typed).to_flat() == cfg.to_flat()  # what `flwr run` gets


# -- reply checks --------------------------------------------------------------------------
def _adapter() -> dict[AdapterKey, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        AdapterKey("m", Role.A, "weight"): torch.randn(4, 6, generator=g),
        AdapterKey("m", Role.B, "weight"): torch.randn(5, 4, generator=g),
    }


def test_reject_reason_accepts_a_fitting_reply_and_names_each_fault() -> None:
    start = _adapter()
    good = {k: v + 0.01 for k, v in start.items()}
    assert reject_reason(good, start, max_norm=1.0) is None
    a, b = sorted(start)
    assert "missing 1 tensor" in reject_reason({b: good[b]}, start)
    assert "unexpected" in reject_reason(good | {AdapterKey("x", Role.A, "weight"): good[a]}, start)
    assert "shape (4, 5), expected (4, 6)" in reject_reason(good | {a: good[a][:, :5]}, start)
    for bad in (float("nan"), float("inf")):
        broken = good[a].clone()
        broken[1, 2] = bad
        assert "NaN or Inf" in reject_reason(good | {a: broken}, start)
    assert "dtype" in reject_reason(good | {a: good[a].long()}, start)
    far = {k: v + 1.0 for k, v in start.items()}
    norm = update_norm(far, start)
    assert math.isclose(norm, math.sqrt(4 * 6 + 5 * 4), rel_tol=1e-6)  # float32 steps of 1.0
    assert "exceeds server.max_update_norm" in reject_reason(far, start, max_norm=norm * 0.99)
    assert reject_reason(far, start, max_norm=norm * 1.01) is None


def test_expected_reply_has_the_shapes_each_client_sends(make_config) -> None:
    """Truncated for a low-rank FLoRA client, R only for Fed-SB: what train_round really returns."""
    for overrides, pid in ((["strategy=flora", "strategy.client_ranks=[2,8]"], 0), (["strategy=fed_sb"], 1)):
        cfg = make_config("clients=2", *overrides)
        worker = Worker(cfg, num_partitions=2)
        state = worker.adapted.initial_state()
        expected = worker.adapted.protocol.expected_reply(pid, state, server_round=1)
        sent = {k: v for k, v in worker.adapted.protocol.download(state).items()}
        payload, _, _ = worker.train_round(pid, sent, server_round=1)
        assert {k: tuple(v.shape) for k, v in payload.items()} == {k: tuple(v.shape) for k, v in expected.items()}
        assert reject_reason(payload, expected) is None


# -- certificates and commands ----------------------------------------------------------------
def test_certificates_chain_to_the_ca_and_node_keys_load_as_flower_loads_them(tmp_path) -> None:
    deploy.make_certificates(tmp_path, hosts=["10.1.2.3", "link.example"], nodes=2)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]
    for i in range(2):
        private = load_ssh_private_key((tmp_path / f"node-{i}").read_bytes(), None)
        public = load_ssh_public_key((tmp_path / f"node-{i}.pub").read_bytes())
        assert private.public_key().public_numbers() == public.public_numbers()
        assert private.curve.name == "secp384r1"
        assert (tmp_path / f"node-{i}").stat().st_mode & 0o077 == 0
    before = (tmp_path / "ca.crt").read_bytes()
    deploy.make_certificates(tmp_path, hosts=["10.1.2.3", "link.example"], nodes=3)  # never overwrites; adds node-2
    assert (tmp_path / "ca.crt").read_bytes() == before and (tmp_path / "node-2.pub").exists()


def test_deploy_cli_prints_commands_with_tls_and_auth(tmp_path, capsys) -> None:
    assert main(["deploy", "certs", str(tmp_path), "--nodes", "1"]) == 0
    assert main(["deploy", "superlink", "--certs", str(tmp_path), "--print"]) == 0
    link = capsys.readouterr().out
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):  # fmt: skip
        assert flag in link
    assert "--insecure" not in link
    argv = ["deploy", "supernode", "--superlink", "h:8000", "--ca", str(tmp_path / "ca.crt"), "--key",
            str(tmp_path / "node-0"), "--partition-id", "2", "--num-partitions", "3", "--data-path", "/d/x.csv",
            "--print"]  # fmt: skip
    assert main(argv) == 0
    node = capsys.readouterr().out
    assert "--root-certificates" in node and "--auth-supernode-private-key" in node
    assert 'partition-id=2 num-partitions=3 data-path="/d/x.csv"' in node
    assert main(["deploy", "run", "strategy=fedsvd", "rounds=5", "--print"]) == 0
    assert 'strategy.name="fedsvd"' in capsys.readouterr().out
    assert main(["deploy", "superlink", "--certs", str(tmp_path / "none"), "--print"]) == 2
    assert main(["deploy", "run", "strategy=nope", "--print"]) == 2


@pytest.mark.parametrize(
    "path", ["/data/a b.csv", "/data/it's.csv", "C:\\x\\y.csv", '/d/"q" x=1', "/x' partition-id=5 '", "C:\\it's"]
)
def test_a_data_path_cannot_inject_node_config_keys(path) -> None:
    argv = deploy.supernode_command(superlink="h:1", ca=None, key=Path("k"), partition_id=0, data_path=path)
    parsed = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert parsed == {"partition-id": 0, "data-path": path}


def test_a_data_path_flower_cannot_carry_is_refused() -> None:
    with pytest.raises(ConfigError, match="quotes of both kinds"):
        deploy.node_config_string('it\'s "x"')


def test_certificates_carry_key_usage(tmp_path) -> None:
    deploy.make_certificates(tmp_path, hosts=["10.0.0.1"], nodes=0)
    ca = x509.load_pem_x509_certificate((tmp_path / deploy.CA_CERT).read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / deploy.SERVER_CERT).read_bytes())
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ca_usage.critical and ca_usage.value.key_cert_sign and not ca_usage.value.digital_signature
    usage = server.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_compose_gives_each_container_only_its_own_files_and_publishes_on_loopback() -> None:
    import yaml

    compose_file = yaml.safe_load((Path(__file__).parents[2] / "docker" / "compose.yaml").read_text())
    mounts = {name: service.get("volumes", []) for name, service in compose_file["services"].items()}
    whole = [name for name, volumes in mounts.items() if any(v.split(":")[0] == "./certs" for v in volumes)]
    assert whole == ["certs"]  # only the job that issues them sees ca.key
    for i in range(3):
        assert mounts[f"supernode-{i}"] == [f"./certs/node-{i}:/certs:ro"]
    assert "./certs/superlink:/certs:ro" in mounts["superlink"]
    assert compose_file["services"]["superlink"]["ports"] == ["127.0.0.1:8000:8000"]
    assert deploy.superlink_command(Path("c"))[deploy.superlink_command(Path("c")).index("--host") + 1] == "127.0.0.1"


# -- checkpoints and resume ---------------------------------------------------------------------
def test_checkpoint_meta_and_metrics_resume(tmp_path) -> None:
    state = _adapter()
    meta = {"ledgers": {"3": [[1.1, 0.0625, 10]]}, "fold_version": 2}
    save_checkpoint(tmp_path, state, server_round=4, meta=meta)
    loaded, server_round, got = load_checkpoint_meta(tmp_path / "checkpoint.safetensors")
    assert server_round == 4 and got == meta
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temporary left behind
    log = MetricsLog(tmp_path / "metrics.csv")
    for r in range(4):
        log.append({"round": r, "test_accuracy": 0.5})
    MetricsLog(tmp_path / "metrics.csv", resume_after=2).append({"round": 3, "test_accuracy": 0.7})
    assert [(r["round"], r["test_accuracy"]) for r in read_metrics(tmp_path / "metrics.csv")] == [
        ("0", "0.5"), ("1", "0.5"), ("2", "0.5"), ("3", "0.7")
    ]  # fmt: skip


# -- a node's own data ----------------------------------------------------------------------------
def test_node_file_with_fewer_labels_maps_them_by_name(make_config, tmp_path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("text,label\n" + "".join(f"text {i},{'cat' if i % 2 else 'fish'}\n" for i in range(20)))
    cfg = make_config("data=files", f"data.path={path}")
    splits = load_splits(cfg.data, seed=0, label_names=("bird", "cat", "dog", "fish"))
    assert splits.label_names == ("bird", "cat", "dog", "fish")
    assert set(splits.train["label"]) | set(splits.test["label"]) == {1, 3}
    with pytest.raises(ConfigError, match="not labels of the run"):
        load_splits(cfg.data, seed=0, label_names=("bird", "cat"))


def test_deploy_says_only_true_things(tmp_path, capsys, monkeypatch) -> None:
    """--print writes nothing and says what it would write; other hosts are refused; run's config is inline."""
    import shlex

    certs = tmp_path / "certs"
    assert main(["deploy", "certs", str(certs), "--nodes", "1", "--print"]) == 0
    assert "would write:" in capsys.readouterr().out and not certs.exists()
    assert main(["deploy", "certs", str(certs), "--hosts", "10.0.0.5", "link.example.org"]) == 0
    assert "wrote:" in capsys.readouterr().out
    assert sorted(deploy.server_hosts(certs)) == ["10.0.0.5", "link.example.org"]
    assert main(["deploy", "certs", str(certs), "--hosts", "10.0.0.6"]) == 2  # would silently keep the old one
    assert "is for ['10.0.0.5', 'link.example.org'], not ['10.0.0.6']" in capsys.readouterr().err

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    argv = ["deploy", "connection", "--superlink", "10.0.0.5:8000", "--ca", str(certs / "ca.crt")]
    assert main([*argv, "--print"]) == 0
    shown = capsys.readouterr().out
    assert 'address = "10.0.0.5:8000"' in shown and not (tmp_path / "flwr" / "config.toml").exists()
    assert main(argv) == 0 and (tmp_path / "flwr" / "config.toml").is_file()

    assert main(["deploy", "run", "strategy=fedsvd", "output_dir=/tmp/a b", "--print"]) == 0
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    inline = command[command.index("--run-config") + 1]
    parsed = parse_config_args([inline])
    assert parsed["strategy.name"] == "fedsvd" and parsed["output_dir"] == "/tmp/a b"


def test_a_private_key_others_can_read_is_refused_with_the_fix(tmp_path, capsys) -> None:
    """As ssh does: an existing ca.key or server.key of mode 0644 is not passed to the SuperLink or kept."""
    deploy.make_certificates(tmp_path, nodes=1)
    assert (tmp_path / deploy.SERVER_KEY).stat().st_mode & 0o777 == 0o600  # what fedlora writes
    (tmp_path / deploy.SERVER_KEY).chmod(0o644)
    for argv in (
        ["deploy", "superlink", "--certs", str(tmp_path), "--print"],
        ["deploy", "certs", str(tmp_path), "--print"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"chmod 600 {tmp_path / deploy.SERVER_KEY}" in err, err
    (tmp_path / deploy.SERVER_KEY).chmod(0o600)
    (tmp_path / "node-0").chmod(0o640)
    args = ["deploy", "supernode", "--superlink", "127.0.0.1:8000", "--ca", str(tmp_path / deploy.CA_CERT),
            "--key", str(tmp_path / "node-0"), "--partition-id", "0", "--num-partitions", "1", "--print"]  # fmt: skip
    assert main(args) == 2 and "mode 0640" in capsys.readouterr().err
    assert main(["deploy", "superlink", "--certs", str(tmp_path), "--print"]) == 0


def test_the_first_ctrl_c_says_at_once_what_happens_and_the_second_stops_now(capfd) -> None:
    import signal

    from fedlora.federation import stopping

    signals = stopping.Signals()
    stopping.STOP.clear()
    try:
        signals.handle(signal.SIGINT, None)
        assert stopping.STOP.is_set() and signals.exit_code == 130
        assert "Ctrl-C again to stop now" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            signals.handle(signal.SIGINT, None)
    finally:
        stopping.STOP.clear()
