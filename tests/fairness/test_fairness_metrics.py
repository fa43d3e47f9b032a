"""Fairness metrics from sites' summed vectors against fairlearn on the pooled predictions."""

from __future__ import annotations

import numpy as np
import pytest

from client.fairness import site_vector, suppress
from fedrad.core.config import RunConfig
from fedrad.core.errors import ConfigError
from fedrad.core.fairness import FairnessLayout
from fedrad.core.scores import SCORE_EDGES, edge_index, score_bins
from server.fairness import auc_binning_error, fairness_report, interval
from server.metrics import exact_auc

fairlearn_metrics = pytest.importorskip("fairlearn.metrics")

Y_TRUE = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0])
Y_PRED = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0])
GROUPS = np.array(["M"] * 8 + ["F"] * 8)


def _layout(attributes: str = "sex", intersections: str = "", classes: int = 2) -> FairnessLayout:
    return FairnessLayout.from_config(
        num_classes=classes, positive_label=1, attributes=attributes, intersections=intersections
    )


def _sites_total(layout, scores, labels, attributes, site_of, *, min_cell_count=1):
    """Each site's suppressed vector and their sum, as the coordinator adds them."""
    per_site = {}
    for site in sorted(set(site_of)):
        idx = [i for i, s in enumerate(site_of) if s == site]
        vector = site_vector(layout, scores[idx], labels[idx], [attributes[i] for i in idx])
        per_site[site] = suppress(vector, layout, min_cell_count=min_cell_count)
    return per_site, sum(per_site.values())


def _binary_scores(pred: np.ndarray) -> np.ndarray:
    p = np.where(pred == 1, 0.9, 0.1)
    return np.stack([1 - p, p], axis=1)


def test_reference_vector_gaps_match_fairlearn_and_the_issue():
    # Prepare: the reference predictions, split across three sites
    layout = _layout()
    attributes = [{"sex": g} for g in GROUPS]
    site_of = [i % 3 for i in range(16)]
    _, total = _sites_total(layout, _binary_scores(Y_PRED), Y_TRUE, attributes, site_of)

    # Execute
    report = fairness_report(layout, total, threshold=0.5)
    gaps = report["families"][0]["classes"]["1"]["gaps"]

    # Check: the issue's values, and fairlearn's on the pooled predictions
    expected = {
        "demographic-parity-difference": fairlearn_metrics.demographic_parity_difference(
            Y_TRUE, Y_PRED, sensitive_features=GROUPS
        ),
        "demographic-parity-ratio": fairlearn_metrics.demographic_parity_ratio(
            Y_TRUE, Y_PRED, sensitive_features=GROUPS
        ),
        "equalized-odds-difference": fairlearn_metrics.equalized_odds_difference(
            Y_TRUE, Y_PRED, sensitive_features=GROUPS
        ),
        "equal-opportunity-difference": fairlearn_metrics.equal_opportunity_difference(
            Y_TRUE, Y_PRED, sensitive_features=GROUPS
        ),
    }
    assert gaps == pytest.approx(expected, abs=1e-12)
    assert gaps == pytest.approx(
        {
            "demographic-parity-difference": 0.25,
            "demographic-parity-ratio": 0.5,
            "equalized-odds-difference": 0.416667,
            "equal-opportunity-difference": 0.416667,
        },
        abs=1e-6,
    )


def test_random_predictions_match_fairlearn_for_every_attribute():
    # Prepare: 600 patients over 4 sites with random attributes and scores
    rng = np.random.default_rng(7)
    n = 600
    labels = rng.integers(0, 2, n)
    positive = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 0.999)
    scores = np.stack([1 - positive, positive], axis=1)
    sexes = rng.choice(["M", "F"], n)
    bands = rng.choice(["20-29", "40-49", "60-69", "80-89"], n)
    attributes = [{"sex": s, "age-band": b} for s, b in zip(sexes, bands, strict=True)]
    layout = _layout("sex,age-band", "sex*age-band")
    _, total = _sites_total(layout, scores, labels, attributes, rng.integers(0, 4, n))
    threshold = float(SCORE_EDGES[47])
    report = fairness_report(layout, total, threshold=threshold)
    predicted = (score_bins(positive) >= edge_index(threshold)).astype(int)  # sites bin scores

    # Check: every gap and the per-group rates agree with fairlearn on the pooled data
    features = {"sex": sexes, "age-band": bands, "sex*age-band": np.char.add(sexes, bands)}
    for family in report["families"]:
        feature = features[family["name"]]
        body = family["classes"]["1"]
        for name, fn in (
            ("demographic-parity-difference", fairlearn_metrics.demographic_parity_difference),
            ("demographic-parity-ratio", fairlearn_metrics.demographic_parity_ratio),
            ("equalized-odds-difference", fairlearn_metrics.equalized_odds_difference),
            ("equal-opportunity-difference", fairlearn_metrics.equal_opportunity_difference),
        ):
            assert body["gaps"][name] == pytest.approx(
                fn(labels, predicted, sensitive_features=feature), abs=1e-12
            ), (family["name"], name)
        frame = fairlearn_metrics.MetricFrame(
            metrics=fairlearn_metrics.true_positive_rate,
            y_true=labels,
            y_pred=predicted,
            sensitive_features=feature,
        )
        worst = body["worst"]["sensitivity"]["value"]
        assert worst == pytest.approx(float(frame.group_min()), abs=1e-12)


def test_histogram_auc_is_within_its_stated_binning_error_of_the_exact_auc():
    rng = np.random.default_rng(3)
    for spread in (0.3, 0.02, 0.001):  # the last crowds every score into one or two bins
        labels = rng.integers(0, 2, 400)
        positive = np.clip(0.5 + spread * rng.normal(size=400) + spread * labels, 0, 0.999)
        scores = np.stack([1 - positive, positive], axis=1)
        layout = _layout()
        vector = site_vector(layout, scores, labels, [{"sex": "M"}] * 400)
        report = fairness_report(layout, vector, threshold=0.5)
        auc = report["families"][0]["classes"]["1"]["groups"][0]["auc"]
        exact = exact_auc(positive, labels)
        assert abs(auc["value"] - exact) <= auc["binning-error"] + 1e-12
    assert auc["binning-error"] > 0.1  # crowded scores: the bound says the AUC is uncertain


def test_binning_error_of_separated_scores_is_zero():
    assert auc_binning_error(np.array([0, 0, 5]), np.array([3, 0, 0])) == 0.0


def test_wilson_interval_and_its_widening_under_noise():
    plain = interval(8, 10)
    assert plain["value"] == 0.8
    assert plain["low"] == pytest.approx(0.4902, abs=1e-4)  # Wilson 95% of 8/10
    assert plain["high"] == pytest.approx(0.9433, abs=1e-4)
    noisy = interval(8, 10, var_k=4.0, var_n=4.0)
    assert noisy["low"] < plain["low"] and noisy["high"] >= plain["high"]
    assert interval(0, 0)["value"] is None


def test_multiclass_is_reported_one_vs_rest_per_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 2.0 * np.eye(3)[labels]
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sexes = rng.choice(["M", "F"], 300)
    layout = _layout(classes=3)
    vector = site_vector(layout, scores, labels, [{"sex": s} for s in sexes])
    report = fairness_report(layout, vector, threshold=0.5)
    classes = report["families"][0]["classes"]
    assert set(classes) == {"0", "1", "2"}
    predicted = scores.argmax(axis=1)
    for k in range(3):
        expected = fairlearn_metrics.equal_opportunity_difference(
            labels == k, predicted == k, sensitive_features=sexes
        )
        assert classes[str(k)]["gaps"]["equal-opportunity-difference"] == pytest.approx(expected)


def test_small_cells_are_suppressed_complementarily_and_flagged():
    # Prepare: 30 M, 2 F, 1 unknown: F and unknown are small; together 3 < 10
    layout = _layout()
    sexes = ["M"] * 30 + ["F"] * 12 + ["unknown"] * 2
    labels = np.array([i % 2 for i in range(len(sexes))])
    scores = _binary_scores(labels)
    vector = suppress(
        site_vector(layout, scores, labels, [{"sex": s} for s in sexes]), layout, min_cell_count=10
    )
    by_label = {c.label: c for c in layout.cells}

    # Check: 'unknown' (2) is out, and F (12, the smallest other) with it, so 44 - 30 = 14
    # gives only the sum of two suppressed cells, never one of them
    assert layout.count(vector, by_label["sex=M"]) == 30
    assert layout.suppressed(vector, by_label["sex=unknown"]) == 1
    assert layout.suppressed(vector, by_label["sex=F"]) == 1
    assert not layout.block(vector, by_label["sex=F"])[2:].any()
    assert layout.block(vector, by_label["sex=F"])[0] == 0


def test_intersection_rows_cannot_reveal_a_suppressed_cell():
    layout = _layout("sex,age-band", "sex*age-band")
    people = [("F", "40-49")] * 20 + [("F", "50-59")] * 3 + [("M", "40-49")] * 20
    people += [("M", "50-59")] * 15
    labels = np.zeros(len(people), dtype=int)
    attributes = [{"sex": s, "age-band": a} for s, a in people]
    vector = suppress(
        site_vector(layout, _binary_scores(labels), labels, attributes), layout, min_cell_count=10
    )
    published = {
        c.label: layout.count(vector, c)
        for c in layout.cells
        if layout.suppressed(vector, c) == 0 and layout.count(vector, c) > 0
    }
    # sex=F (23) is published; F&50-59 (3) must not be recoverable as 23 - F&40-49
    assert published["sex=F"] == 23
    assert "sex=F&age-band=50-59" not in published
    assert "sex=F&age-band=40-49" not in published
    # every row and column of the intersection leaves out 0 or at least 10 patients
    for attribute_value, total in (("sex=F", 23), ("sex=M", 35)):
        row = [v for k, v in published.items() if k.startswith(attribute_value + "&")]
        assert total - sum(row) == 0 or total - sum(row) >= 10


def test_layouts_reject_unknown_attributes_with_a_hint():
    with pytest.raises(ConfigError, match="Did you mean 'age-band'"):
        RunConfig(fairness_attributes="sex,age_band")
    with pytest.raises(ConfigError, match="two attributes joined by"):
        RunConfig(fairness_intersections="sex")
    layout = RunConfig(fairness_intersections="sex*modality").fairness_layout
    assert [f.name for f in layout.families][-1] == "sex*modality"
    assert layout.size == 1 + (3 + 11 + 11 + 11 + 33) * layout.cell_size
