"""On-disk cache of a site's checked files and preprocessed samples.

In deployment every message starts a fresh ClientApp process, so an in-memory cache would not
survive a round. Each file's content is hashed once; later passes revalidate a file by path,
size and modification time. A sample's key is the hash of its files' contents plus the
transform configuration, so changing the image size or a file's bytes never serves a stale
tensor. Samples of one site and transform configuration live in one packed safetensors file
as ONE stacked tensor, so that a cached pass is a handful of reads, not one per sample.

Layout under the cache root (node config ``cache-dir``)::

    <site-digest>/files.json     a header line (format, record schema, digest of the rest),
                                 then path -> [size, mtime_ns, *verdict record] (client.ingest)
    <site-digest>/samples-<transform>.safetensors   tensor "samples" (N, C, *spatial); its
                                 metadata holds the N sample keys, in order, the format and
                                 the summary of the last pass (see client.dataset), with
                                 its digest

A cache written in another format, or one that does not hold together, is ignored (and
rewritten at the end of the pass), never misread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from client.transforms import TransformConfig
from fedrad.core.durable import replace_atomically, write_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bumped whenever the layout changes: 2 = one stacked sample tensor, verdicts as lists,
a one-file sample keyed by the file's own hash."""
_PACK = "samples"


def default_cache_root() -> Path:
    """Where a site caches when its node config names no ``cache-dir``."""
    return Path.home() / ".cache" / "fedrad" / "sites"


def transform_digest(config: TransformConfig) -> str:
    """A short digest of everything that shapes a preprocessed sample."""
    payload = json.dumps({"format": CACHE_FORMAT, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sample_key(file_hashes: list[str]) -> str:
    """Key of a sample made of these files (in order): a single file's is its own hash."""
    if len(file_hashes) == 1:
        return file_hashes[0]
    return hashlib.sha256("|".join(file_hashes).encode()).hexdigest()


class SiteCache:
    """The cache of one site folder; load once per pass, ``save()`` at the end of a pass.

    ``schema`` names the fields of a verdict record; an index written with another schema
    is ignored.
    """

    def __init__(
        self,
        root: Path,
        site_dir: Path,
        transform: TransformConfig,
        *,
        schema: Sequence[str] = (),
    ) -> None:
        digest = hashlib.sha256(str(site_dir.resolve()).encode()).hexdigest()[:16]
        self.folder = root / digest
        self.transform = transform
        self.schema = list(schema)
        self._files_path = self.folder / "files.json"
        self._samples_path = self.folder / f"samples-{transform_digest(transform)}.safetensors"
        self._files: dict[str, list[Any]] | None = None
        self.summary: Any = None
        """What the last complete pass found (JSON data), if the pack holds it intact."""
        self.samples: dict[str, torch.Tensor] = self._read_samples()
        self._dirty = False

    @property
    def files(self) -> dict[str, list[Any]]:
        """The index: path -> [size, mtime_ns, *verdict record] (read on first use)."""
        if self._files is None:
            self._files = self._read_files()
        return self._files

    def _read_files(self) -> dict[str, list[Any]]:
        try:
            head, _, body = self._files_path.read_bytes().partition(b"\n")
            header = json.loads(head)
            if not isinstance(header, dict) or header.get("format") != CACHE_FORMAT:
                return {}  # another format: rebuilt, never misread
            if header.get("digest") != hashlib.sha256(body).hexdigest():
                raise ValueError("its content does not match its digest")
            files = json.loads(body)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable cache index %s (%s)", self._files_path, exc)
            return {}
        if header.get("schema") != self.schema or not isinstance(files, dict):
            log.warning("ignoring cache index %s: another verdict schema", self._files_path)
            return {}
        return files

    def _read_samples(self) -> dict[str, torch.Tensor]:
        if not self._samples_path.is_file():
            return {}
        try:
            with safe_open(str(self._samples_path), framework="pt") as pack_file:
                meta = pack_file.metadata() or {}
                if meta.get("format") != str(CACHE_FORMAT):
                    return {}
                keys = json.loads(meta["keys"])
                pack = pack_file.get_tensor(_PACK) if keys else None
            samples = self._unpack(keys, pack)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable sample cache %s (%s)", self._samples_path, exc)
            return {}
        text = meta.get("pass", "")
        if text and meta.get("pass-digest") == hashlib.sha256(text.encode()).hexdigest():
            try:
                self.summary = json.loads(text)
            except ValueError:
                self.summary = None
        return samples

    def _unpack(self, keys: object, pack: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Sample views of the pack, after checking that keys and pack agree."""
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ValueError("sample keys are not a list of strings")
        if not keys:
            return {}
        expected = (len(keys), self.transform.in_channels, *self.transform.spatial_size)
        if pack is None or pack.dtype != torch.float32 or tuple(pack.shape) != expected:
            raise ValueError(f"pack is not float32 {expected}")
        if len(set(keys)) != len(keys):
            raise ValueError("repeated sample keys")
        return dict(zip(keys, pack.unbind(0), strict=True))

    def verdict(self, rel: str, stat: os.stat_result) -> list[Any] | None:
        """The cached verdict record of a file, if its size and mtime are unchanged."""
        entry = self.files.get(rel)
        if (
            isinstance(entry, list)
            and len(entry) > 2
            and entry[0] == stat.st_size
            and entry[1] == stat.st_mtime_ns
        ):
            return entry[2:]
        return None

    def remember(self, rel: str, stat: os.stat_result, record: list[Any]) -> None:
        """Record a file's verdict record (which carries its content hash when accepted)."""
        self.files[rel] = [stat.st_size, stat.st_mtime_ns, *record]
        self._dirty = True

    def forget(self, rel: str) -> None:
        """Drop a file's entry (its cached record turned out unusable)."""
        if self.files.pop(rel, None) is not None:
            self._dirty = True

    def forget_missing(self, present: set[str]) -> None:
        """Drop entries of files no longer in the folder."""
        gone = [rel for rel in self.files if rel not in present]
        for rel in gone:
            del self.files[rel]
        self._dirty = self._dirty or bool(gone)

    def sample(self, key: str) -> torch.Tensor | None:
        """A cached preprocessed sample."""
        return self.samples.get(key)

    def put_sample(self, key: str, tensor: torch.Tensor) -> None:
        """Cache a preprocessed sample."""
        self.samples[key] = tensor
        self._dirty = True

    def keep_only(self, keys: set[str]) -> None:
        """Drop cached samples that no label refers to any more."""
        stale = [key for key in self.samples if key not in keys]
        for key in stale:
            del self.samples[key]
        self._dirty = self._dirty or bool(stale)

    def remember_pass(self, summary: object) -> None:
        """Keep what this pass found (JSON data), or None, with the samples."""
        if summary != self.summary:
            self.summary = summary
            self._dirty = True

    def save(self) -> None:
        """Write the index and the sample pack atomically (only when something changed)."""
        if not self._dirty:
            return
        body = json.dumps(self.files, separators=(",", ":")).encode()
        header = {
            "format": CACHE_FORMAT,
            "schema": self.schema,
            "digest": hashlib.sha256(body).hexdigest(),
        }
        write_atomic(self._files_path, json.dumps(header).encode() + b"\n" + body)
        meta = {"format": str(CACHE_FORMAT), "keys": json.dumps(list(self.samples))}
        if self.summary is not None:
            meta["pass"] = json.dumps(self.summary, separators=(",", ":"))
            meta["pass-digest"] = hashlib.sha256(meta["pass"].encode()).hexdigest()
        samples = list(self.samples.values())
        replace_atomically(self._samples_path, lambda p: _write_pack(p, samples, meta))
        self._dirty = False


def _write_pack(path: Path, samples: list[torch.Tensor], meta: dict[str, str]) -> None:
    """Write ``samples`` as the one safetensors tensor ``(N, *shape)``, sample after sample.

    The layout is safetensors' own (header length as 8 bytes little-endian, JSON header
    padded to 8 bytes, then the raw little-endian data), read back by safetensors, which
    checks it. Writing each sample's bytes in turn spares stacking them and the library
    writer's copy of the stack: a large share of the end of a first pass.
    """
    header: dict[str, Any] = {"__metadata__": meta}
    shape = tuple(samples[0].shape) if samples else ()
    if samples:
        size = len(samples) * math.prod(shape) * 4
        header[_PACK] = {"dtype": "F32", "shape": [len(samples), *shape], "data_offsets": [0, size]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for sample in samples:
            if tuple(sample.shape) != shape or sample.dtype != torch.float32:
                raise ValueError(f"sample of shape {tuple(sample.shape)}, not float32 {shape}")
            handle.write(sample.contiguous().numpy().astype("<f4", copy=False).data)
