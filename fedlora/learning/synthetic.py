"""The embedded default data: 4-topic sentences of made-up words, generated in code from the run seed.

Why made-up words: with real topic words ("goal match team" for sports) pretrained MiniLM was
perfect after the first round (0.06 -> 1.000), so the default run showed no learning and no
strategy, partition or DP setting differed from another. Words the encoder has never seen,
one or two per sentence among filler words, and 10% of labels drawn at random, make accuracy
climb over the rounds (0.26 -> 0.57 -> 0.87 -> 0.88 at the defaults, of at most 0.925).
"""

from __future__ import annotations

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict

TOPICS = ("sports", "weather", "food", "technology")
WORDS_PER_TOPIC = 15
FILLER_WORDS = 16
_VOCABULARY_SEED = 20241205  # fixed: every run, seed and process shares one vocabulary


def synthetic_vocabulary() -> tuple[dict[str, list[str]], list[str]]:
    """The embedded default's made-up words: ``({topic: its words}, filler words)``, the same in every run.

    Words of two or three consonant-vowel syllables ("bekiro"; a few are English by chance,
    "vase" among technology's, in no topic's sense): a pretrained encoder has no topic for
    them, so what a model learns of the topics it learns from the federation's data.
    """
    rng = np.random.default_rng(_VOCABULARY_SEED)
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    words: list[str] = []
    while len(words) < len(TOPICS) * WORDS_PER_TOPIC + FILLER_WORDS:
        word = "".join(str(rng.choice(consonants)) + str(rng.choice(vowels)) for _ in range(rng.integers(2, 4)))
        if word not in words:
            words.append(word)
    topics = {name: words[i * WORDS_PER_TOPIC : (i + 1) * WORDS_PER_TOPIC] for i, name in enumerate(TOPICS)}
    return topics, words[len(TOPICS) * WORDS_PER_TOPIC :]


def synthetic_topics(n_train: int, n_test: int, *, seed: int, label_noise: float) -> DatasetDict:
    """Synthetic 4-topic sentences: 1-2 made-up topic words among 4-8 made-up filler words, shuffled.

    Generated from ``seed`` with no file and no network (:func:`synthetic_vocabulary`).
    ``label_noise``: the fraction of examples (train and test alike) whose label is drawn
    uniformly at random instead, as real labels are noisy; the best achievable accuracy is
    then 1 - label_noise * 3/4. It shows learning over a few rounds; it measures nothing
    about real language.
    """
    rng = np.random.default_rng(seed)
    topics, filler = synthetic_vocabulary()

    def sample(n: int) -> Dataset:
        labels = rng.integers(0, len(TOPICS), size=n)
        texts = []
        for label in labels:
            words = list(rng.choice(topics[TOPICS[label]], size=rng.integers(1, 3), replace=False))
            words += list(rng.choice(filler, size=rng.integers(4, 9)))
            rng.shuffle(words)
            texts.append(" ".join(words))
        noisy = rng.random(n) < label_noise
        labels = np.where(noisy, rng.integers(0, len(TOPICS), size=n), labels)
        return Dataset.from_dict(
            {"text": texts, "label": labels.tolist()},
        ).cast_column("label", ClassLabel(names=list(TOPICS)))

    return DatasetDict({"train": sample(n_train), "test": sample(n_test)})


__all__ = ["TOPICS", "synthetic_topics", "synthetic_vocabulary"]
