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


def test_small_cells_are_suppressed():
    samples = [{"sex": "F", "age-band": "40-49", "manufacturer": "Philips", "modality": "CT"}] * 12
    samples += [{"sex": "M", "age-band": "90+", "manufacturer": "Philips", "modality": "CT"}] * 3

    counts = subgroup_counts(samples, min_cell_count=10)

    assert counts == {
        "sex=F": 12,
        "age-band=40-49": 12,
        "manufacturer=philips": 15,
        "modality=CT": 15,
    }


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
