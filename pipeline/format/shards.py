"""A whole Zarr shard encoded in one call, in the writer's thread: the bytes zarr-python writes for it, without
its partial-write path.

zarr-python 3 sends every write to a sharded array through that path, even one that covers a whole shard: it
reads the existing shard, fills a new buffer per inner chunk with the fill value, copies the data into it, and
concatenates the encoded chunks. All of this runs on zarr's one event-loop thread, which every writer thread
shares. Those copies took 77-90% of a shard write in `benchmarks/bench_host.py`, and they kept writer threads
from scaling. A capture always writes whole shards, so it encodes them here, with the same codecs (numcodecs', as
zarr's own wrappers call them), and stores the bytes itself.

The layout follows the Zarr v3 sharding codec: the encoded inner chunks in order, then the index, which has one
(offset, nbytes) uint64 pair per inner chunk (2^64 - 1 twice for a chunk past the array's end), little-endian,
followed by its CRC32C. Only the layouts a `CacheWriter` creates are encoded: bytes (little-endian) or pcodec as
the serializer, then byte shuffle and/or zstd. `ShardEncoder.of` returns None for anything else, and the caller
then writes through zarr. `tests/test_host.py` checks that the bytes equal zarr's for every field layout.
"""

from __future__ import annotations

import numpy as np

EMPTY = np.uint64(2**64 - 1)


class ShardEncoder:
    """Encodes the shards of one sharded Zarr array (see the module's docstring)."""

    def __init__(self, chunk_rows: int, shard_rows: int, serializer, compressors: list, fill):
        self.chunk_rows, self.shard_rows = chunk_rows, shard_rows
        self.serializer, self.compressors, self.fill = serializer, compressors, fill

    @classmethod
    def of(cls, arr) -> "ShardEncoder | None":
        """The encoder for `arr`'s layout, or None when it is not one this module writes."""
        import numcodecs

        codecs = arr.metadata.codecs
        if len(codecs) != 1 or type(codecs[0]).__name__ != "ShardingCodec":
            return None
        sharding = codecs[0]
        index = [c.to_dict() for c in sharding.index_codecs]
        if sharding.index_location.value != "end" or [c["name"] for c in index] != ["bytes", "crc32c"] or \
                index[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if any(c != s for c, s in zip(sharding.chunk_shape[1:], arr.shape[1:])):
            return None  # chunked along rows only
        inner = [c.to_dict() for c in sharding.codecs]
        first = inner[0]
        if first["name"] == "bytes":
            if first.get("configuration", {}).get("endian", "little") != "little" and arr.dtype.itemsize > 1:
                return None
            serializer = None
        elif first["name"] == "numcodecs.pcodec":
            serializer = numcodecs.get_codec({"id": "pcodec", **first.get("configuration", {})})
        else:
            return None
        compressors = []
        for c in inner[1:]:
            cfg = c.get("configuration", {})
            if c["name"] == "zstd":
                compressors.append(numcodecs.Zstd(level=cfg.get("level", 0), checksum=cfg.get("checksum", False)))
            elif c["name"] == "numcodecs.shuffle":
                compressors.append(numcodecs.Shuffle(**cfg))
            else:
                return None
        shard_rows = arr.metadata.chunk_grid.chunk_shape[0]
        return cls(sharding.chunk_shape[0], shard_rows, serializer, compressors, arr.metadata.fill_value)

    def encode_chunk(self, x: np.ndarray) -> memoryview:
        """One inner chunk's bytes (a view of `x` itself when nothing encodes it: no copy)."""
        buf = np.ascontiguousarray(x)
        out = buf.view(np.uint8).reshape(-1) if self.serializer is None else self.serializer.encode(buf)
        for c in self.compressors:
            out = c.encode(out)
        return memoryview(out).cast("B")

    def encode(self, data: np.ndarray) -> list[memoryview]:
        """The parts of a shard holding `data` (its rows from the shard's first; fewer than shard_rows for the last
        shard of an array whose rows end inside it): the encoded chunks, then the index. Their concatenation is the
        shard; kept apart so that nothing is copied to join them (write them in order, hash them in order)."""
        import google_crc32c

        n = self.shard_rows // self.chunk_rows
        index = np.full((n, 2), EMPTY, dtype="<u8")
        parts, offset = [], 0
        for i in range(n):
            a = i * self.chunk_rows
            if a >= len(data):
                break  # past the array's end: no chunk
            x = data[a : a + self.chunk_rows]
            if len(x) < self.chunk_rows:  # the array's last chunk: padded with the fill value, as zarr does
                pad = np.full((self.chunk_rows - len(x), *x.shape[1:]), self.fill, dtype=x.dtype)
                x = np.concatenate([x, pad])
            enc = self.encode_chunk(x)
            parts.append(enc)
            index[i] = (offset, enc.nbytes)
            offset += enc.nbytes
        raw = index.tobytes()
        crc = np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()
        return parts + [memoryview(raw + crc)]
