"""``fedrad import-npz``: a MedMNIST-format archive becomes site folders of DICOM with labels.

Rules
-----
Split routing
    The first split the archive holds, in the order train, val, test, is distributed over
    ``OUT_DIR/site-1..N``; inside each site about ``val_fraction`` of each class is marked
    ``val``, the rest ``train`` (every site of two or more samples gets both). Every other
    split is written whole to ``OUT_DIR/holdout/<split>`` (e.g. ``holdout/val``,
    ``holdout/test``) with split ``test``, for ``fedrad evaluate``. The holdout folders sit
    under ``holdout/``, which ``fedrad simulate`` never trains on. So an archive with only
    ``test_*`` (or only ``val_*``) is distributed to the sites like ``train``.
Kind detection
    ``(N, H, W)`` and ``(N, H, W, 1)`` are 2D grey, ``(N, H, W, 3)`` 2D RGB (MedMNIST keeps
    channels last), other ``(N, D, H, W)`` 3D volumes when ``D > 4``; ``(N, D<=4, H, W)`` is
    refused as ambiguous. ``kind`` (``--kind 2d|3d``) overrides: ``3d`` reads any 4-D array as
    ``(N, D, H, W)``. Slices are taken along the second axis, with nominal 1 mm voxels.
Partition (``--split``)
    ``iid`` uniform; ``dirichlet`` label skew, per-class site proportions ~ Dirichlet(alpha);
    ``size`` size skew, site sizes ~ Dirichlet(alpha) with iid labels. Every site gets at
    least 10 samples (dirichlet moves random samples from the largest site to fill up);
    an archive too small for that is refused.
Modality
    Written as given (default ``OT``) on Secondary Capture objects, 8-bit MONOCHROME2 or RGB,
    without rescale tags. ``CT`` is refused: 8-bit MedMNIST values are not Hounsfield units,
    and sites apply a HU window to CT.
Identity
    No patient attributes exist: PatientSex and PatientBirthDate are empty, PatientID is
    synthetic (``NPZ-site1-000123``), Manufacturer is ``MedMNIST import``, InstitutionName the
    folder's name, ImageComments the source (``pneumoniamnist.npz train[123]``).
"""

from fedrad.npz_import.importer import MANIFEST_FILE, FolderSummary, ImportSummary, import_npz

__all__ = ["MANIFEST_FILE", "FolderSummary", "ImportSummary", "import_npz"]
