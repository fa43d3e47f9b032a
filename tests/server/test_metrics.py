import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.train import evaluation_sums
from fedrad.core.keys import SCORE_BINS
from fedrad.core.scores import SCORE_EDGES, bin_centres, score_bins
from server.metrics import exact_auc, histogram_auc, summarize, youden_threshold


def _auc_by_pairs(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 1)), min_size=2, max_size=80))
def test_exact_auc_matches_pair_counting(pairs):
    scores = np.array([p[0] for p in pairs])
    labels = np.array([p[1] for p in pairs])
    if labels.min() == labels.max():
        assert np.isnan(exact_auc(scores, labels))
        return

    assert exact_auc(scores, labels) == pytest.approx(_auc_by_pairs(scores, labels))


def test_histogram_auc_equals_exact_auc_on_binned_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 0.999)
    binned = bin_centres()[score_bins(scores)]
    two_class = np.stack([1 - binned, binned], axis=1)
    _, hist = evaluation_sums(two_class, labels)

    assert histogram_auc(hist[1][1], hist[1][0]) == pytest.approx(exact_auc(binned, labels))


def test_sums_from_sites_add_up_to_the_pooled_metrics():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)
    scores = np.stack([1 - p, p], axis=1)
    parts = [evaluation_sums(scores[i::3], labels[i::3]) for i in range(3)]
    confusion = sum(c for c, _ in parts)
    hist = sum(h for _, h in parts)

    pooled_confusion, pooled_hist = evaluation_sums(scores, labels)
    metrics = summarize(
        num_examples=300, loss_sum=30.0, confusion=confusion, score_hist=hist, positive_label=1
    )

    assert (confusion == pooled_confusion).all() and (hist == pooled_hist).all()
    assert metrics["auc"] == pytest.approx(exact_auc(p, labels), abs=0.01)
    assert metrics["loss"] == pytest.approx(0.1)
    assert 0 < metrics["threshold"] < 1


def test_youden_threshold_separates_perfectly_separable_scores():
    positive = np.zeros(SCORE_BINS, dtype=np.int64)
    negative = np.zeros(SCORE_BINS, dtype=np.int64)
    negative[10:30] = 5
    positive[70:90] = 5

    threshold = youden_threshold(positive, negative)

    assert SCORE_EDGES[30] <= threshold <= SCORE_EDGES[70]


def test_multiclass_summary_has_macro_auc_and_accuracy():
    labels = np.array([0, 1, 2, 0, 1, 2])
    scores = np.eye(3)[labels] * 0.8 + 0.2 / 3
    confusion, hist = evaluation_sums(scores, labels)

    metrics = summarize(
        num_examples=6, loss_sum=1.0, confusion=confusion, score_hist=hist, positive_label=1
    )

    assert metrics["accuracy"] == pytest.approx(1.0)
    assert metrics["auc"] == pytest.approx(1.0)


def test_pooled_auc_states_its_binning_error_and_it_holds_for_crowded_scores():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 500)
    for spread in (0.2, 0.003):  # the second crowds every score into one or two bins
        positive = np.clip(0.5 + spread * (rng.normal(size=500) + labels), 0, 0.999)
        scores = np.stack([1 - positive, positive], axis=1)
        confusion, hist = evaluation_sums(scores, labels)
        metrics = summarize(
            num_examples=500,
            loss_sum=1.0,
            confusion=confusion,
            score_hist=hist,
            positive_label=1,
        )
        exact = exact_auc(positive, labels)
        assert abs(metrics["auc"] - exact) <= metrics["auc-binning-error"] + 1e-12
    assert metrics["auc-binning-error"] > 0.2  # crowded: the AUC of 0.5-ish is not informative


def test_scores_crowded_near_zero_keep_their_ranking():
    # A federated model pulled towards the negative class: every score below 0.01 (the case
    # where equal-width bins gave AUC 0.5 exactly); the tail bins still rank them
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    positive = 1e-4 * np.exp(rng.normal(size=400) + 1.5 * labels)
    assert positive.max() < 0.01
    scores = np.stack([1 - positive, positive], axis=1)
    confusion, hist = evaluation_sums(scores, labels)

    metrics = summarize(
        num_examples=400, loss_sum=1.0, confusion=confusion, score_hist=hist, positive_label=1
    )

    exact = exact_auc(positive, labels)
    assert exact > 0.8
    assert abs(metrics["auc"] - exact) <= metrics["auc-binning-error"] + 1e-12
    assert metrics["auc-binning-error"] < 0.15 and metrics["auc"] > 0.7
    assert metrics["threshold"] < 0.01  # the operating threshold is found among them
