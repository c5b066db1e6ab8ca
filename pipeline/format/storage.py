"""Where a cache lives: a local path or any fsspec URL, and the one layer every byte goes through.

    Storage("data/caches/x")               local disk
    Storage("s3://bucket/caches/x")        s3fs: endpoint and credentials the usual way
                                           (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ~/.aws, ...)
    Storage("https://host/caches/x")       read-only
    Storage("memory://x"), gs://, hf://... whatever fsspec supports, with no code for each

Checksums are streamed in blocks (a shard file is never held in memory whole). `fetch_verified`
copies one file to local disk and checks its sha256 as the bytes arrive; a file that does not match
never appears under its final name. Errors of the storage backends (network, credentials, missing
bucket) come out as one `StorageError` that names the location. No torch, no transformers.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from ..errors import StorageError

BLOCK = 4 << 20  # bytes per read while hashing or copying


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def stream_digest(f) -> dict:
    """{"bytes", "sha256"} of what an open binary file yields, read in blocks."""
    h, n = hashlib.sha256(), 0
    while block := f.read(BLOCK):
        h.update(block)
        n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


# the backends' own types for "could not connect" (aiohttp for http(s), botocore for s3)
UNREACHABLE = {"ClientConnectionError", "EndpointConnectionError", "ConnectTimeoutError"}


def unreachable(error: BaseException | None) -> bool:
    """Whether an error says the location could not be reached at all (a refused or dropped connection, a
    timeout, an unknown host), as opposed to an answer about the object."""
    if error is None:
        return False
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return bool({c.__name__ for c in type(error).__mro__} & UNREACHABLE)


@contextmanager
def storage_errors(location: str, doing: str):
    """Turn whatever a storage backend raises (OSError, botocore and aiohttp errors, ...) into one
    StorageError naming the location; StorageError itself passes through."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{doing} {location}: not found ({e})") from e
    except PermissionError as e:
        raise StorageError(f"{doing} {location}: permission denied ({e})") from e
    except Exception as e:  # backends raise their own types: NoCredentialsError, ClientConnectorError, ...
        raise StorageError(f"{doing} {location}: {type(e).__name__}: {e}") from e


class Storage:
    """A cache root on any fsspec filesystem; paths below it are relative, '/'-separated."""

    def __init__(self, location: str | Path, storage_options: dict | None = None, fresh: bool = False):
        """`fresh`: a filesystem instance of this process's own, not fsspec's cached one (in a forked
        DataLoader worker the parent's s3fs instance, with its event loop, must not be reused)."""
        import fsspec

        self.location = str(location).rstrip("/") or str(location)
        self.options = dict(storage_options or {})
        with storage_errors(self.location, "cannot open"):
            self.fs, root = fsspec.core.url_to_fs(self.location, **self.options,
                                                  **({"skip_instance_cache": True} if fresh else {}))
        self.root = root.rstrip("/") if root not in ("/", "") else root
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = protocol in ("file", "local")

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    @property
    def where(self) -> Path | str:
        """The location as users name it: a local Path on local disk, else the URL."""
        return self.local_path() if self.is_local else self.location

    def local_path(self, rel: str = "") -> Path:
        if not self.is_local:
            raise StorageError(f"{self.location} is not on local disk")
        return Path(self.path(rel))

    def child(self, rel: str) -> "Storage":
        return Storage(self.location + "/" + rel, self.options)

    # -- reading ------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        """A file at `rel` (False for anything else the backend answers, as fsspec's isfile does). A location
        that cannot be reached at all (a refused connection, an unknown host, a timeout) is a StorageError
        naming the cause, never "no such file"."""
        try:
            return self.fs.info(self.path(rel)).get("type", "file") == "file"
        except Exception as e:  # noqa: BLE001  fsspec's HTTP backend turns every failure into FileNotFoundError
            cause = e.__cause__ if isinstance(e, FileNotFoundError) else e
            if unreachable(cause):
                raise StorageError(f"cannot reach {self.location}: {type(cause).__name__}: {cause}") from e
            return False

    def has(self, rel: str) -> bool:
        """A file or a folder (a prefix, on object stores) at `rel`."""
        with storage_errors(self.location, f"cannot look up {rel} in"):
            return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with storage_errors(f"{self.location}/{rel}", "cannot read"):
            return self.fs.cat_file(self.path(rel))

    def open(self, rel: str, mode: str = "rb"):
        with storage_errors(f"{self.location}/{rel}", "cannot open"):
            return self.fs.open(self.path(rel), mode)

    def digest(self, rel: str) -> dict:
        """{"bytes", "sha256"} of one file, read in blocks."""
        with storage_errors(f"{self.location}/{rel}", "cannot read"), self.fs.open(self.path(rel), "rb") as f:
            return stream_digest(f)

    def files(self) -> dict[str, int | None]:
        """Every file under the root: {relative path: size, None where the backend does not say}."""
        with storage_errors(self.location, "cannot list"):
            found = self.fs.find(self.root, detail=True)
        out = {}
        prefix = self.root.rstrip("/") + "/"
        for p, info in found.items():
            if info.get("type", "file") == "file":
                rel = p[len(prefix):] if p.startswith(prefix) else p
                out[rel] = None if info.get("size") is None else int(info["size"])
        return out

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (relative to the root)."""
        prefix = self.root.rstrip("/") + "/"
        with storage_errors(self.location, "cannot list"):
            return sorted(p[len(prefix):] for p in self.fs.glob(prefix + pattern))

    # -- writing ------------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes | list) -> None:
        """One object (file) at once, from bytes or a list of buffers written in order (not joined on local disk);
        on local disk through a temporary name, fsynced, renamed."""
        parts = data if isinstance(data, list) else [data]
        with storage_errors(f"{self.location}/{rel}", "cannot write"):
            if self.is_local:
                path = self.local_path(rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                with open(tmp, "wb") as f:
                    for part in parts:
                        f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(self.path(rel), b"".join(parts))

    def size(self, rel: str) -> int:
        with storage_errors(f"{self.location}/{rel}", "cannot look up"):
            return int(self.fs.size(self.path(rel)))

    def upload(self, local: Path, rel: str) -> None:
        """A local file to `rel`, appearing whole: on local disk copied under a temporary name, fsynced and
        renamed; elsewhere one upload."""
        with storage_errors(f"{self.location}/{rel}", "cannot upload to"):
            if self.is_local:
                path = self.local_path(rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                shutil.copyfile(local, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.put_file(str(local), self.path(rel))

    def copy_from(self, src: "Storage", rel: str) -> None:
        """One file from another storage, streamed in blocks."""
        if src.is_local:
            return self.upload(src.local_path(rel), rel)
        with storage_errors(f"{self.location}/{rel}", "cannot copy to"), src.open(rel) as fin, \
                self.fs.open(self.path(rel), "wb") as fout:
            while block := fin.read(BLOCK):
                fout.write(block)

    def remove_tree(self, rel: str) -> None:
        """A folder (a prefix, on object stores) and everything below it; nothing when absent."""
        with storage_errors(f"{self.location}/{rel}", "cannot remove"):
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)

    def remove(self, rel: str) -> None:
        with storage_errors(f"{self.location}/{rel}", "cannot remove"):
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel))


def fetch_verified(src: Storage, rel: str, expected: dict, dest: Path) -> None:
    """Copy `rel` to the local file `dest`, hashing as it arrives; raise (leaving nothing under `dest`)
    when size or sha256 differ from `expected`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}-{os.urandom(4).hex()}.partial")  # readers may race
    h, n = hashlib.sha256(), 0
    try:
        with src.open(rel) as fin, open(part, "wb") as fout:
            with storage_errors(f"{src.location}/{rel}", "cannot read"):
                while block := fin.read(BLOCK):
                    h.update(block)
                    n += len(block)
                    fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        got = {"bytes": n, "sha256": h.hexdigest()}
        if got != {"bytes": expected["bytes"], "sha256": expected["sha256"]}:
            what = "size" if n != expected["bytes"] else "checksum"
            raise StorageError(f"{src.location}/{rel}: {what} mismatch (the manifest says {expected['bytes']} bytes, "
                               f"sha256 {expected['sha256'][:16]}...; got {n} bytes, {got['sha256'][:16]}...)")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
