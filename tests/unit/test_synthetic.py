"""The embedded default data: a fixed made-up vocabulary, labels that follow it, the label noise asked for."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from fedlora.config.run import ConfigError
from fedlora.learning.synthetic import TOPICS, synthetic_topics, synthetic_vocabulary

ROOT = Path(__file__).resolve().parents[2]


def topic_of(text: str, topics: dict[str, list[str]]) -> set[str]:
    return {name for name, words in topics.items() if set(text.split()) & set(words)}


def test_the_vocabulary_is_fixed_and_its_topics_and_filler_are_disjoint() -> None:
    topics, filler = synthetic_vocabulary()
    assert (topics, filler) == synthetic_vocabulary()
    every = [w for words in topics.values() for w in words] + filler
    assert len(every) == len(set(every)) and all(re.fullmatch(r"[a-z]{4,6}", w) for w in every)
    assert list(topics) == list(TOPICS)


def test_without_noise_each_sentence_holds_words_of_its_own_topic_only() -> None:
    topics, _ = synthetic_vocabulary()
    data = synthetic_topics(500, 100, seed=3, label_noise=0.0)
    for split in ("train", "test"):
        for row in data[split]:
            assert topic_of(row["text"], topics) == {TOPICS[row["label"]]}


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_label_noise_replaces_the_asked_fraction_of_labels_with_uniform_draws(noise: float) -> None:
    topics, _ = synthetic_vocabulary()
    rows = synthetic_topics(20_000, 1, seed=0, label_noise=noise)["train"]
    wrong = np.mean([topic_of(r["text"], topics) != {TOPICS[r["label"]]} for r in rows])
    # a redrawn label is wrong 3 times in 4: the Bayes accuracy is 1 - noise * 3/4
    assert wrong == pytest.approx(noise * 3 / 4, abs=0.01)


def test_the_sentences_depend_on_the_seed_and_the_vocabulary_does_not() -> None:
    a, b = (synthetic_topics(50, 10, seed=s, label_noise=0)["train"] for s in (0, 1))
    assert a["text"] != b["text"]
    assert set(" ".join(a["text"]).split()) | set(" ".join(b["text"]).split()) <= {
        *synthetic_vocabulary()[1],
        *(w for words in synthetic_vocabulary()[0].values() for w in words),
    }


def test_a_label_noise_outside_0_1_is_refused() -> None:
    from fedlora.config.compose import compose

    with pytest.raises(ConfigError, match="synthetic_label_noise"):
        compose(["data.synthetic_label_noise=1.5"])


def test_the_readme_predict_example_uses_words_of_the_topic_it_names() -> None:
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if x.startswith("fedlora predict"))
    text, named = re.search(r'"([^"]+)"\s+#.*"(\w+)"', line).groups()
    topics, filler = synthetic_vocabulary()
    assert topic_of(text, topics) == {named} and set(text.split()) <= {*topics[named], *filler}
