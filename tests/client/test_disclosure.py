from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client.disclosure import VOCABULARY, coarsen, subgroup_counts, vendor
from client.reply import ReplyNotAllowed, check_reply
from fedrad.core import keys


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("SIEMENS", "siemens"),
        ("GE MEDICAL SYSTEMS", "ge"),
        ("TOSHIBA_MEC", "canon"),
        ("FUJIFILM Corporation", "fujifilm"),
        ("Dr. John Smith", "other"),
        ("", "other"),
    ],
)
def test_vendor_maps_free_text_onto_closed_vocabulary(raw, expected):
    assert vendor(raw) == expected


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["sex", "age-band", "manufacturer", "modality"]), st.text()))
def test_coarsened_values_are_always_in_the_vocabulary(attributes):
    coarse = coarsen(attributes)

    assert all(coarse[a] in VOCABULARY[a] for a in VOCABULARY)


def test_small_cells_are_suppressed_with_their_complements():
    samples = [{"sex": "F", "age-band": "40-49", "manufacturer": "Philips", "modality": "CT"}] * 12
    samples += [{"sex": "M", "age-band": "90+", "manufacturer": "Philips", "modality": "CT"}] * 3

    counts = subgroup_counts(samples, min_cell_count=10)

    # sex=F 12 alone would give sex=M = 15 - 12 = 3 away (15 from manufacturer=philips)
    assert counts == {"manufacturer=philips": 15, "modality=CT": 15}


def _plain_suppression(samples, *, min_cell_count):
    """A deliberately weakened site: small cells left out, nothing else."""
    counts = Counter()
    for sample in samples:
        for attribute, value in coarsen(sample).items():
            counts[f"{attribute}={value}"] += 1
    return {k: n for k, n in counts.items() if n >= min_cell_count}


def _recovered_by_subtraction(published, total, *, min_cell_count):
    """What a coordinator derives: per attribute, the total minus the published cells."""
    derived = {}
    for attribute in VOCABULARY:
        cells = {k: n for k, n in published.items() if k.startswith(attribute + "=")}
        residual = total - sum(cells.values())
        if cells and 0 < residual < min_cell_count:
            derived[attribute] = residual
    return derived


SUBTRACTION_CASE = (
    [{"sex": "M", "age-band": "40-49", "manufacturer": "GE", "modality": "DX"}] * 12
    + [{"sex": "F", "age-band": "40-49", "manufacturer": "GE", "modality": "DX"}] * 12
    + [{"sex": "unknown", "age-band": "50-59", "manufacturer": "GE", "modality": "DX"}]
)


def test_subtraction_recovers_a_cell_from_a_weakened_site():
    published = _plain_suppression(SUBTRACTION_CASE, min_cell_count=10)

    # 12 M + 12 F of 25: the suppressed cell is 1 (the attack the issue describes)
    assert _recovered_by_subtraction(published, 25, min_cell_count=10) == {
        "sex": 1,
        "age-band": 1,
    }


def test_subtraction_recovers_nothing_from_a_real_site():
    published = subgroup_counts(SUBTRACTION_CASE, min_cell_count=10)

    assert _recovered_by_subtraction(published, 25, min_cell_count=10) == {}
    assert published["manufacturer=ge"] == 25  # cells that need no protection still go out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "sex": st.sampled_from(["M", "F", "unknown"]),
                "age-band": st.sampled_from(["30-39", "40-49", "90+"]),
                "manufacturer": st.sampled_from(["GE", "Siemens", "Philips", "x"]),
                "modality": st.sampled_from(["CT", "DX"]),
            }
        ),
        max_size=80,
    ),
    st.integers(min_value=1, max_value=15),
)
def test_no_suppressed_count_is_derivable(samples, min_cell_count):
    published = subgroup_counts(samples, min_cell_count=min_cell_count)

    assert all(n >= min_cell_count for n in published.values())
    assert _recovered_by_subtraction(published, len(samples), min_cell_count=min_cell_count) == {}
    for attribute in VOCABULARY:  # a lone left-out cell is never the whole residual
        counts = Counter(coarsen(s)[attribute] for s in samples)
        left_out = [n for v, n in counts.items() if f"{attribute}={v}" not in published]
        small = [n for n in left_out if n < min_cell_count]
        assert not small or len(left_out) >= 2 or len(left_out) == len(counts)


def _reply(**records):
    base = {
        keys.ARRAYS: ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
        keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3, keys.LOSS_SUM: 1.0}),
        keys.SITE: ConfigRecord({keys.SITE_ID: "site-1"}),
    }
    base.update(records)
    return RecordDict(base)


def test_allowed_reply_passes():
    check_reply(_reply(**{keys.SUBGROUPS: ConfigRecord({"sex=F": 12})}), min_cell_count=10)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"pixels": ArrayRecord({"x": Array(np.zeros(4, dtype=np.float32))})}, "record 'pixels'"),
        ({keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 3, "patient-age": 45})}, "patient-age"),
        ({keys.SITE: ConfigRecord({keys.SITE_ID: "s", "patient-id": "P1"})}, "patient-id"),
        ({keys.SUBGROUPS: ConfigRecord({"sex=F": 3})}, "below the site's min-cell-count of 10"),
        ({keys.SUBGROUPS: ConfigRecord({"name=Smith": 30})}, "unknown"),
        ({keys.SUBGROUPS: ConfigRecord({"manufacturer=Dr Smith": 30})}, "unknown"),
    ],
)
def test_disallowed_reply_is_refused(records, message):
    with pytest.raises(ReplyNotAllowed, match=message):
        check_reply(_reply(**records), min_cell_count=10)
