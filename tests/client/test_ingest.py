"""Preprocessing a worker's chunk: batched, and a file that fails it fails alone."""

import shutil

import numpy as np
import pytest
import torch

import client.ingest as ingest_module
from client.dataset import IngestSettings, load_site
from client.dicom import read_pixels
from client.ingest import Ingested, preprocess_chunk
from client.scan import AcceptedFile, QuarantinedFile
from client.transforms import TransformConfig, preprocess

CONFIG = TransformConfig(kind="2d", image_size=16)


def _accepted(path: str, modality: str = "DX") -> AcceptedFile:
    return AcceptedFile(
        path, "0" * 64, 1, 1, modality, "1.2", "1.3", "", "", 20, 20, 1, 1, "1.2.840.10008.1.2.1",
        None, None, "", None, ""
    )  # fmt: skip


def _chunk() -> list[Ingested]:
    rng = np.random.default_rng(5)
    return [
        Ingested(_accepted("a"), values=rng.normal(size=(20, 20)).astype(np.float32)),
        Ingested(QuarantinedFile("b", "truncated", "cut")),
        Ingested(_accepted("c", "CT"), values=rng.normal(size=(20, 20)).astype(np.float32)),
        Ingested(_accepted("d"), values=rng.normal(size=(30, 12)).astype(np.float32)),
        Ingested(_accepted("e"), values=rng.normal(size=(20, 20)).astype(np.float32)),
    ]


def test_a_chunk_is_preprocessed_as_each_file_alone_would_be():
    chunk = _chunk()
    marked: list[int] = []

    out = preprocess_chunk(CONFIG, chunk, marked.append)

    assert out[1] == chunk[1]
    for before, after in zip(chunk, out, strict=True):
        if before.values is None:
            continue
        assert after.values is None and after.verdict == before.verdict
        alone = preprocess(before.values, modality=before.verdict.modality, config=CONFIG)
        np.testing.assert_allclose(after.image, alone.numpy(), rtol=0, atol=1e-6)
    assert sorted(marked) == [0, 2, 3]  # one mark per batch: DX 20x20 (a, e), CT, DX 30x12


def test_a_file_failing_preprocessing_is_quarantined_alone(monkeypatch):
    chunk = _chunk()
    bad = chunk[4].values

    def failing_batch(values, **kwargs):
        raise ValueError("batch failed")

    def failing_one(values, **kwargs):
        if values is bad:
            raise ValueError("cannot resize this one")
        return preprocess(values, **kwargs)

    monkeypatch.setattr(ingest_module, "preprocess_batch", failing_batch)
    monkeypatch.setattr(ingest_module, "preprocess", failing_one)

    out = preprocess_chunk(CONFIG, chunk)

    assert out[4].verdict == QuarantinedFile("e", "malformed", "ValueError: cannot resize this one")
    assert out[4].image is None
    assert all(out[i].image is not None for i in (0, 2, 3))


@pytest.mark.parametrize("workers", [1, 2])
def test_in_a_pass_the_failing_file_is_skipped_with_its_reason(
    sites_2d, tmp_path, monkeypatch, workers
):
    site = tmp_path / "site"
    shutil.copytree(sites_2d / "site-1", site)
    target = sorted((site / "images").iterdir())[3]
    bad = read_pixels(target)

    def failing_batch(values, **kwargs):
        if any(np.array_equal(v, bad) for v in values):
            raise ValueError("batch failed")
        return ingest_module_batch(values, **kwargs)

    def failing_one(values, **kwargs):
        if np.array_equal(values, bad):
            raise ValueError("cannot resize this one")
        return preprocess(values, **kwargs)

    ingest_module_batch = ingest_module.preprocess_batch
    monkeypatch.setattr(ingest_module, "preprocess_batch", failing_batch)  # forked workers see it
    monkeypatch.setattr(ingest_module, "preprocess", failing_one)
    settings = IngestSettings(workers=workers, cache_root=tmp_path / "cache")

    dataset = load_site(site, CONFIG, num_classes=2, settings=settings)

    rel = f"images/{target.name}"
    assert dataset.skipped == [(rel, "malformed: ValueError: cannot resize this one")]
    assert rel not in {s.id for s in dataset.samples}
    assert len(dataset.samples) == len(list((site / "images").iterdir())) - 1


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pass_gives_each_file_its_own_preprocessed_image(sites_2d, workers):
    site = sites_2d / "site-1"

    dataset = load_site(site, CONFIG, num_classes=2, settings=IngestSettings(workers=workers))

    assert len(dataset.samples) > 20
    for sample in dataset.samples:
        values = read_pixels(site / sample.id)
        alone = preprocess(values, modality=sample.attributes["modality"], config=CONFIG)
        torch.testing.assert_close(sample.image, alone, rtol=0, atol=1e-6)
