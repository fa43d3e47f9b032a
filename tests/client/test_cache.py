import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import client.dataset as dataset_module
from client.dataset import IngestSettings, load_site
from client.transforms import TransformConfig
from fedrad.core.errors import DataError

CONFIG = TransformConfig(kind="2d", image_size=32)


@pytest.fixture
def site(sites_2d, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(sites_2d / "site-1", copy)
    return copy


@pytest.fixture
def counted_ingest(monkeypatch):
    ingested: list[str] = []
    real = dataset_module.ingest_files

    def counting(site_dir, relatives, **kwargs):
        ingested.extend(relatives)
        return real(site_dir, relatives, **kwargs)

    monkeypatch.setattr(dataset_module, "ingest_files", counting)
    return ingested


def test_cached_pass_decodes_nothing_and_gives_identical_samples(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    first = load_site(site, CONFIG, num_classes=2, settings=settings)
    decoded_first = len(counted_ingest)

    second = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert decoded_first == len(first)
    assert len(counted_ingest) == decoded_first  # nothing decoded on the second pass
    assert [s.id for s in first.samples] == [s.id for s in second.samples]
    pairs = zip(first.samples, second.samples, strict=True)
    assert all(torch.equal(a.image, b.image) for a, b in pairs)


def test_a_changed_file_is_decoded_again(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    load_site(site, CONFIG, num_classes=2, settings=settings)
    counted_ingest.clear()
    target = sorted((site / "images").iterdir())[0]
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    load_site(site, CONFIG, num_classes=2, settings=settings)

    assert counted_ingest == [f"images/{target.name}"]


def test_a_new_transform_never_serves_stale_tensors(site, tmp_path):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    load_site(site, CONFIG, num_classes=2, settings=settings)

    bigger = load_site(
        site, TransformConfig(kind="2d", image_size=48), num_classes=2, settings=settings
    )

    assert all(tuple(s.image.shape) == (1, 48, 48) for s in bigger.samples)


def test_quarantined_verdicts_are_cached_too(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    bad = sorted((site / "images").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:300])
    first = load_site(site, CONFIG, num_classes=2, settings=settings)
    counted_ingest.clear()

    second = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert counted_ingest == []
    assert first.skipped == second.skipped and len(second.skipped) == 1
    assert second.skipped[0][0] == f"images/{bad.name}"


def test_a_damaged_cache_is_rebuilt_not_trusted(site, tmp_path):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    reference = load_site(site, CONFIG, num_classes=2, settings=settings)
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\\x00garbage")

    again = load_site(site, CONFIG, num_classes=2, settings=settings)

    pairs = zip(reference.samples, again.samples, strict=True)
    assert all(torch.equal(a.image, b.image) for a, b in pairs)


def _rewrite_index_header(cache_root, **changes):
    (index,) = cache_root.rglob("files.json")
    head, _, body = index.read_bytes().partition(b"\n")
    header = {**json.loads(head), **changes}
    index.write_bytes(json.dumps(header).encode() + b"\n" + body)
    return index


def _rewrite_pack_metadata(cache_root, **changes):
    (pack,) = cache_root.rglob("samples-*.safetensors")
    with safe_open(str(pack), framework="pt") as handle:
        meta, tensor = handle.metadata(), handle.get_tensor("samples")
    meta = {k: v for k, v in {**meta, **changes}.items() if v is not None}
    save_file({"samples": tensor}, str(pack), meta)


def test_a_cache_of_another_format_is_ignored_and_rebuilt(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    reference = load_site(site, CONFIG, num_classes=2, settings=settings)
    _rewrite_index_header(tmp_path / "cache", format=1)
    _rewrite_pack_metadata(tmp_path / "cache", format="1")
    counted_ingest.clear()

    again = load_site(site, CONFIG, num_classes=2, settings=settings)
    third = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert len(counted_ingest) == len(reference)  # all re-checked once, then cached again
    for other in (again, third):
        pairs = zip(reference.samples, other.samples, strict=True)
        assert all(torch.equal(a.image, b.image) for a, b in pairs)


def test_an_index_edited_behind_its_digest_is_not_trusted(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    reference = load_site(site, CONFIG, num_classes=2, settings=settings)
    (index,) = (tmp_path / "cache").rglob("files.json")
    rel = reference.samples[0].id
    record = json.loads(index.read_bytes().partition(b"\n")[2])[rel]  # size, mtime, kind, sha
    index.write_bytes(index.read_bytes().replace(record[3].encode(), b"0" * 64, 1))
    _rewrite_pack_metadata(tmp_path / "cache", **{"pass": None})  # a pass that needs the index
    counted_ingest.clear()

    again = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert len(counted_ingest) == len(reference)
    assert [s.id for s in again.samples] == [s.id for s in reference.samples]


def test_a_pack_whose_keys_do_not_fit_is_rebuilt(site, tmp_path):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    reference = load_site(site, CONFIG, num_classes=2, settings=settings)
    (pack,) = (tmp_path / "cache").rglob("samples-*.safetensors")
    with safe_open(str(pack), framework="pt") as handle:
        meta, tensor = handle.metadata(), handle.get_tensor("samples")
    keys = json.loads(meta["keys"])
    save_file({"samples": tensor}, str(pack), {**meta, "keys": json.dumps(keys[1:])})

    again = load_site(site, CONFIG, num_classes=2, settings=settings)

    pairs = zip(reference.samples, again.samples, strict=True)
    assert all(torch.equal(a.image, b.image) for a, b in pairs)
    with safe_open(str(pack), framework="pt") as handle:  # rewritten whole
        assert json.loads(handle.metadata()["keys"]) == keys


def test_the_pack_is_one_stacked_tensor(site, tmp_path):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    dataset = load_site(site, CONFIG, num_classes=2, settings=settings)

    (pack,) = (tmp_path / "cache").rglob("samples-*.safetensors")
    with safe_open(str(pack), framework="pt") as handle:
        assert list(handle.keys()) == ["samples"]
        assert handle.get_slice("samples").get_shape() == [len(dataset), 1, 32, 32]


def test_an_unchanged_folder_repeats_the_last_pass_without_reading_labels(
    site, tmp_path, counted_ingest, monkeypatch
):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    reference = load_site(site, CONFIG, num_classes=2, settings=settings)
    monkeypatch.setattr(dataset_module, "read_labels", None)  # must not be needed

    again = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert len(counted_ingest) == len(reference)
    assert [(s.id, s.label, s.split, s.attributes) for s in again.samples] == [
        (s.id, s.label, s.split, s.attributes) for s in reference.samples
    ]
    assert again.skipped == reference.skipped


def test_a_changed_label_is_read_again(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    load_site(site, CONFIG, num_classes=2, settings=settings)
    labels = site / "labels.csv"
    lines = labels.read_text().splitlines()
    sample_id, label, *rest = lines[1].split(",")
    lines[1] = ",".join([sample_id, str(1 - int(label)), *rest])
    labels.write_text("\n".join(lines) + "\n")
    counted_ingest.clear()

    again = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert counted_ingest == []
    assert {s.id: s.label for s in again.samples}[sample_id] == 1 - int(label)


def test_fewer_classes_than_the_labels_need_is_still_refused(site, tmp_path):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    load_site(site, CONFIG, num_classes=2, settings=settings)

    with pytest.raises(DataError, match="not below num-classes=1"):
        load_site(site, CONFIG, num_classes=1, settings=settings)


def test_a_file_added_to_the_folder_ends_the_reuse(site, tmp_path, counted_ingest):
    settings = IngestSettings(cache_root=tmp_path / "cache")
    reference = load_site(site, CONFIG, num_classes=2, settings=settings)
    source_id = reference.samples[0].id
    shutil.copy(site / source_id, site / "images" / "extra.dcm")
    with (site / "labels.csv").open("a") as handle:
        handle.write("images/extra.dcm,1,train\n")
    counted_ingest.clear()

    again = load_site(site, CONFIG, num_classes=2, settings=settings)

    assert counted_ingest == ["images/extra.dcm"]
    duplicate = ("images/extra.dcm", f"duplicate: same content as '{source_id}'")
    assert again.skipped == [*reference.skipped, duplicate]


def test_a_3d_site_is_served_from_the_cache_identically(sites_3d, tmp_path, counted_ingest):
    site = tmp_path / "site-3d"
    shutil.copytree(sites_3d / "site-1", site)
    config = TransformConfig(kind="3d", image_size=16, slices=8)
    settings = IngestSettings(cache_root=tmp_path / "cache")
    first = load_site(site, config, num_classes=2, settings=settings)
    counted_ingest.clear()

    second = load_site(site, config, num_classes=2, settings=settings)

    assert counted_ingest == []
    assert [s.id for s in first.samples] == [s.id for s in second.samples]
    pairs = zip(first.samples, second.samples, strict=True)
    assert all(torch.equal(a.image, b.image) and a.image.shape == (1, 8, 16, 16) for a, b in pairs)
