"""The teacher-cache format on its own: storage, the manifest type, field specs, writer, reader,
verification, and sharing (push, pull, ls). docs/format.md is the spec.

Imports numpy, pyarrow, zarr and fsspec only (never torch or transformers), so a team that
only reads, checks or moves caches does not need the training stack:

    from pipeline.format import Cache, verify
    c = Cache("s3://bucket/caches/x")      # or a local path, https://, ...
    c.manifest.splits["train"].rows, c.manifest.capture.top_k
    c.array("train", "topk_ids")[:8]

    storage.py   where a cache lives (any fsspec URL), checksums      layout.py    paths and small file helpers
    records.py   the manifest's typed parts, read and written         manifest.py  the Manifest type (reads every layout)
    plans.py     a cache's plan built from the records                specs.py     fields and codecs
    columns.py   rows.parquet's columns                               shards.py    a shard's arrays encoded
    writer.py    arrays, shards, commits, the manifest written last   tally.py     statistics from the commit records
    index.py     each part's shard index (shards.parquet)             reader.py    Cache, read_manifest
    verify.py    every checksum, streamed                             share.py     push, pull, ls
    export.py    Parquet for other tools                              distillkit.py  DistillKit's compressed columns
    idcodes.py   topk_ids as frequency codes (4.0)
"""

from ..errors import CacheError, StorageError
from .layout import HEAD_FILE, MANIFEST, TOKENIZER_DIR, row_column, tokenizer_fingerprint
from .manifest import FORMAT_NAME, FORMAT_VERSION, Manifest
from .reader import Cache, read_manifest
from .share import list_caches, pull, push
from .specs import FieldSpec, field_specs
from .storage import Storage
from .verify import verify
from .writer import CacheWriter

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HEAD_FILE", "MANIFEST", "TOKENIZER_DIR", "Cache", "CacheError",
           "CacheWriter", "FieldSpec", "Manifest", "field_specs", "read_manifest", "row_column",
           "tokenizer_fingerprint", "verify", "list_caches", "pull", "push", "Storage", "StorageError"]
