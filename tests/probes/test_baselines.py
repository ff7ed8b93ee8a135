"""Text-only baselines: keyword counts declared with a concept, and a bag-of-words logistic
regression cross-validated on the evaluation set itself."""

import random

import numpy as np
import pytest

from auditor.errors import InvalidInputError
from probes.baselines import bag_of_words_scores, keyword_pattern, keyword_scores
from probes.separation import auroc


def test_keywords_count_whole_words_and_phrases_case_insensitively():
    lexicon = ["python", "pip install", "pythonic"]
    texts = [
        "Python is fine; use PIP   install requests, very pythonic.",  # 3: phrase across spaces
        "cpython and python3 are other words, as is pip-install",  # 0: not whole words
        "python python",  # 2
    ]
    assert keyword_scores(texts, lexicon).tolist() == [3.0, 0.0, 2.0]
    assert keyword_pattern(["a.b"]).search("a.b") and not keyword_pattern(["a.b"]).search("axb")  # escaped
    with pytest.raises(InvalidInputError, match="no lexicon"):
        keyword_scores(texts, ["  "])


def _lexical_set(n: int, seed: int):
    """Label 1 texts use 'grim' / 'bleak' somewhere among filler words; label 0 do not."""
    rng = random.Random(seed)
    filler = [
        "the",
        "a",
        "day",
        "report",
        "team",
        "plan",
        "result",
        "week",
        "meeting",
        "data",
        "project",
        "update",
        "note",
    ]
    texts, labels = [], []
    for i in range(n):
        words = rng.choices(filler, k=12)
        label = i % 2
        if label:
            words[rng.randrange(12)] = rng.choice(["grim", "bleak"])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def test_bag_of_words_learns_the_sets_own_vocabulary_out_of_fold():
    texts, labels = _lexical_set(200, seed=0)
    scores = bag_of_words_scores(texts, labels)
    assert scores.shape == (200,) and np.all((scores >= 0) & (scores <= 1))
    assert auroc(scores, labels) > 0.95
    # Out of fold: on labels with no relation to the words, it cannot do better than chance.
    shuffled = labels[:]
    random.Random(1).shuffle(shuffled)
    assert abs(auroc(bag_of_words_scores(texts, shuffled), shuffled) - 0.5) < 0.12


def test_bag_of_words_needs_two_texts_of_each_label():
    with pytest.raises(InvalidInputError, match="two texts of each label"):
        bag_of_words_scores(["a b", "c d", "e f"], [0, 0, 1])


def test_an_evaluation_too_small_for_cross_validation_keeps_its_keyword_baseline():
    from probes.concepts import load_concept
    from workers.monitoring.evaluation import text_baselines

    texts = ["this is hopeless and doomed", "a fine sunny day", "lunch was good", "the plan works"]
    baselines = text_baselines(load_concept("pessimism"), texts, [1, 0, 0, 0], n_boot=100)
    assert set(baselines) == {"keyword"} and baselines["keyword"].auroc == 1.0
