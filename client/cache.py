"""On-disk cache of a site's checked files and preprocessed samples.

In deployment every message starts a fresh ClientApp process, so an in-memory cache would not
survive a round. Each file's content is hashed once; later passes revalidate a file by path,
size and modification time. A sample's key is the hash of its files' contents plus the
transform configuration, so changing the image size or a file's bytes never serves a stale
tensor. Samples of one site and transform configuration live in one packed safetensors file,
so that a cached pass is a handful of reads, not one per sample.

Layout under the cache root (node config ``cache-dir``)::

    <site-digest>/files.json                 path -> size, mtime_ns, sha256, scan verdict
    <site-digest>/samples-<transform>.safetensors   sample key -> preprocessed tensor
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from client.transforms import TransformConfig
from fedrad.durable import replace_atomically, write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def default_cache_root() -> Path:
    """Where a site caches when its node config names no ``cache-dir``."""
    return Path.home() / ".cache" / "fedrad" / "sites"


def transform_digest(config: TransformConfig) -> str:
    """A short digest of everything that shapes a preprocessed sample."""
    payload = json.dumps({"format": CACHE_FORMAT, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sample_key(file_hashes: list[str]) -> str:
    """Key of a sample made of these files (in order)."""
    return hashlib.sha256("|".join(file_hashes).encode()).hexdigest()


class SiteCache:
    """The cache of one site folder; load once per pass, ``save()`` at the end of a pass."""

    def __init__(self, root: Path, site_dir: Path, transform: TransformConfig) -> None:
        digest = hashlib.sha256(str(site_dir.resolve()).encode()).hexdigest()[:16]
        self.folder = root / digest
        self.transform = transform
        self._files_path = self.folder / "files.json"
        self._samples_path = self.folder / f"samples-{transform_digest(transform)}.safetensors"
        self.files: dict[str, dict[str, Any]] = self._read_files()
        self.samples: dict[str, torch.Tensor] = self._read_samples()
        self._dirty = False

    def _read_files(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._files_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable cache index %s (%s)", self._files_path, exc)
            return {}
        if data.get("format") != CACHE_FORMAT:
            return {}
        return dict(data.get("files", {}))

    def _read_samples(self) -> dict[str, torch.Tensor]:
        if not self._samples_path.is_file():
            return {}
        try:
            return dict(load_file(str(self._samples_path)))
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable sample cache %s (%s)", self._samples_path, exc)
            return {}

    def verdict(self, rel: str, stat: os.stat_result) -> dict[str, Any] | None:
        """The cached check result of a file, if its size and mtime are unchanged."""
        entry = self.files.get(rel)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return dict(entry["verdict"])
        return None

    def remember(self, rel: str, stat: os.stat_result, verdict: dict[str, Any]) -> None:
        """Record a file's check result (which carries its content hash when accepted)."""
        self.files[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "verdict": verdict}
        self._dirty = True

    def forget_missing(self, present: set[str]) -> None:
        """Drop entries of files no longer in the folder."""
        gone = set(self.files) - present
        for rel in gone:
            del self.files[rel]
        self._dirty = self._dirty or bool(gone)

    def sample(self, key: str) -> torch.Tensor | None:
        """A cached preprocessed sample."""
        return self.samples.get(key)

    def put_sample(self, key: str, tensor: torch.Tensor) -> None:
        """Cache a preprocessed sample."""
        self.samples[key] = tensor.contiguous()
        self._dirty = True

    def keep_only(self, keys: set[str]) -> None:
        """Drop cached samples that no label refers to any more."""
        stale = set(self.samples) - keys
        for key in stale:
            del self.samples[key]
        self._dirty = self._dirty or bool(stale)

    def save(self) -> None:
        """Write the index and the sample pack atomically (only when something changed)."""
        if not self._dirty:
            return
        payload = json.dumps({"format": CACHE_FORMAT, "files": self.files}, sort_keys=True)
        write_atomic(self._files_path, payload.encode())
        samples = dict(self.samples)
        replace_atomically(self._samples_path, lambda p: save_file(samples, str(p)))
        self._dirty = False
