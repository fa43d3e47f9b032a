"""Synthetic consortium of hospitals: DICOM chest X-rays or CT series with a learnable finding.

``write_consortium(out_dir, SynthConfig(...))`` writes ``OUT_DIR/site-<i>`` folders
(and ``OUT_DIR/holdout``), each with DICOM files and ``labels.csv`` (``id,label,split``).
Sites differ in scanner, resolution, intensities, noise, blur, prevalence and size;
findings of :data:`HARD_SUBGROUP` (female patients) are fainter by
``1 - 0.6 * subgroup_difficulty``, so a fairness report has something true to find.
"""

from fedrad.synth.config import HARD_SUBGROUP, HARD_SUBGROUP_DESCRIPTION, SynthConfig
from fedrad.synth.consortium import SiteSummary, SynthSummary, write_consortium
from fedrad.synth.layout import HOLDOUT_FOLDER, LABELS_FILE, LABELS_HEADER

__all__ = [
    "HARD_SUBGROUP",
    "HARD_SUBGROUP_DESCRIPTION",
    "HOLDOUT_FOLDER",
    "LABELS_FILE",
    "LABELS_HEADER",
    "SiteSummary",
    "SynthConfig",
    "SynthSummary",
    "write_consortium",
]
