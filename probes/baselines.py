"""Text-only baselines a residual-stream probe has to beat on the same rows.

A probe earns its place only where it sees something the words alone do not. Two baselines
read nothing but the text:

- **keyword**: how many times the concept's declared lexicon occurs (the reference article's
  approach: count the words that name the concept). Declared with the concept, never fitted.
- **bag of words**: a logistic regression on word and word-pair counts, cross-validated on the
  evaluation set itself (out-of-fold scores only). It learns the set's own vocabulary, so it is
  an optimistic, upper-bound-ish lexical baseline, not a fair competitor for a probe that never
  saw the set.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from probes.errors import InvalidInputError


def keyword_pattern(lexicon: Sequence[str]) -> re.Pattern[str]:
    """Whole-word, case-insensitive matcher for the lexicon's words and phrases (a phrase
    matches across any run of whitespace)."""
    terms = sorted({term.strip().lower() for term in lexicon if term.strip()}, key=len, reverse=True)
    if not terms:
        raise InvalidInputError("the concept declares no lexicon: a keyword baseline needs one")
    alternatives = "|".join(r"\s+".join(map(re.escape, term.split())) for term in terms)
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)


def keyword_scores(texts: Sequence[str], lexicon: Sequence[str]) -> np.ndarray:
    """Occurrences of the lexicon in each text."""
    pattern = keyword_pattern(lexicon)
    return np.array([len(pattern.findall(text)) for text in texts], dtype=np.float64)


def bag_of_words_scores(texts: Sequence[str], labels: Sequence[int], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold P(label 1) from an L2 logistic regression on unigram + bigram counts,
    stratified `folds`-fold cross-validation on (texts, labels) themselves."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    labels = np.asarray(labels)
    smallest = int(min((labels == 0).sum(), (labels == 1).sum()))
    if smallest < 2:
        raise InvalidInputError("a cross-validated baseline needs at least two texts of each label")
    pipeline = make_pipeline(
        CountVectorizer(ngram_range=(1, 2), min_df=2, token_pattern=r"(?u)\b\w+\b"),
        LogisticRegression(C=1.0, max_iter=2000),
    )
    splitter = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    return cross_val_predict(pipeline, list(texts), labels, cv=splitter, method="predict_proba")[:, 1]
