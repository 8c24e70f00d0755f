"""Exports that describe themselves: reload with no other input, the model card, predict, the portable base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedlora.cli import main
from fedlora.learning.model import resolve_path
from fedlora.learning.worker import Worker
from fedlora.outputs.export import export_adapter, load_exported, register_in_hf_cache


def trained(worker: Worker) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in worker.adapted.initial_state().items()}


def logits_of(model, worker: Worker) -> torch.Tensor:
    batch = {k: v for k, v in next(iter(worker.data.test_batches)).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("strategy", ["fedavg", "fed_sb"])
def test_an_export_reloads_from_its_folder_alone_and_describes_itself(make_config, tmp_path, strategy) -> None:
    worker = Worker(make_config(f"strategy={strategy}"), num_partitions=10)
    folder = export_adapter(worker, trained(worker), tmp_path / "adapter", summary={"test_accuracy": 0.5})
    expected = logits_of(worker.adapted.model, worker)
    torch.testing.assert_close(logits_of(load_exported(folder), worker), expected)  # the tiny base rebuilt too
    config = json.loads((folder / "adapter_config.json").read_text())
    meta = json.loads((folder / "fedlora.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and meta["labels"] == list(worker.data.splits.label_names)
    card = (folder / "README.md").read_text()
    assert f"strategy `{strategy}`" in card and "Final test accuracy: 0.5000" in card and "load_exported" in card
    assert (folder / "tokenizer.json").is_file()


def test_predict_labels_texts_and_a_file(make_config, tmp_path, capsys) -> None:
    worker = Worker(make_config(), num_partitions=10)
    folder = export_adapter(worker, trained(worker), tmp_path / "adapter")
    texts = tmp_path / "texts.txt"
    texts.write_text("rain storm forecast\n\nrecipe pasta chef\n")
    assert main(["predict", "--adapter", str(folder), "goal match team", "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = set(worker.data.splits.label_names)
    assert [line.split("\t")[1] for line in lines] == ["goal match team", "rain storm forecast", "recipe pasta chef"]
    assert all(line.split("\t")[0] in names for line in lines)
    assert main(["predict", "--adapter", str(tmp_path)]) == 2


def test_a_minilm_adapter_names_its_hub_base_which_resolves_offline_to_the_packaged_copy(tmp_path, monkeypatch):
    from peft import AutoPeftModelForSequenceClassification

    from fedlora.config.compose import compose

    # plain peft reads the [CLS] pooler: MiniLM's default mean pooling reloads through load_exported (test_pooling)
    cfg, _ = compose(["data.synthetic_train=40", "data.synthetic_test=8", "clients=2", "model.pooling=cls"])
    worker = Worker(cfg, num_partitions=2)
    folder = export_adapter(worker, trained(worker), tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == cfg.model.hub_id
    cache = tmp_path / "hf"
    register_in_hf_cache(cfg.model.hub_id, Path(resolve_path(cfg.model.path)), cache_dir=cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(folder), num_labels=4, cache_dir=str(cache))
    torch.testing.assert_close(logits_of(model, worker), logits_of(worker.adapted.model, worker), rtol=1e-4, atol=1e-5)


def test_loading_an_export_does_not_report_its_head_as_newly_initialized(tmp_path) -> None:
    """The base is rebuilt with a fresh head that the adapter's saved head replaces at once: transformers'
    load report ("classifier.weight | MISSING ... newly initialized") would say the opposite of the truth.
    In a fresh Python, as a user's script loads it (transformers at its default verbosity)."""
    import subprocess
    import sys

    from fedlora.config.compose import compose

    cfg, _ = compose(["data.synthetic_train=40", "data.synthetic_test=8", "clients=2"])  # MiniLM: pretrained
    worker = Worker(cfg, num_partitions=2)
    folder = export_adapter(worker, trained(worker), tmp_path / "adapter")
    script = (
        "import transformers; from fedlora.outputs.export import load_exported; "
        f"load_exported({str(folder)!r}); print('verbosity', transformers.logging.get_verbosity())"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    said = done.stdout + done.stderr
    assert "MISSING" not in said and "newly initialized" not in said, said
    assert "verbosity 30" in said  # the caller's setting (WARNING), restored
