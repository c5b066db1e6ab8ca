"""The teacher-cache format on its own: storage, manifest, field specs, writer, reader, verification,
and sharing (push, pull, ls). FORMAT.md is the spec.

Imports numpy, pyarrow, zarr and fsspec only (never torch or transformers), so a team that
only reads, checks or moves caches does not need the training stack:

    from pipeline.format import Cache, verify
    c = Cache("s3://bucket/caches/x")      # or a local path, https://, ...
    c.array("train", "topk_ids")[:8]
"""

from .cache import (FORMAT_NAME, FORMAT_VERSION, MANIFEST, Cache, CacheError, CacheWriter, FieldSpec, field_specs,
                    manifest_files, read_manifest, row_column, verify)
from .share import list_caches, pull, push
from .storage import Storage, StorageError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "Cache", "CacheError", "CacheWriter", "FieldSpec",
           "field_specs", "manifest_files", "read_manifest", "row_column", "verify", "list_caches", "pull", "push",
           "Storage", "StorageError"]
