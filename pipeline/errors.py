"""Every failure the pipeline knows and explains: bad settings, data, models, caches, storage.

Each is a `DistillError`; the `distill` command prints its message as one `error:` line and exits 2
(tracebacks are kept for real bugs). The message says what is wrong and, where there is one, which
setting to change. This module imports nothing, so every layer can raise these.
"""

from __future__ import annotations


class DistillError(Exception):
    """A known failure whose message is enough for the user to act on."""


class ConfigError(DistillError, ValueError):
    """A settings file or override that cannot be used; the message says which key and why."""


class DataError(DistillError, ValueError):
    """A dataset that cannot be prepared as configured."""


class TeacherError(DistillError, ValueError):
    """A model (a teacher, or the teacher a student copies layers from) that cannot be loaded or used as
    configured."""


class CaptureError(DistillError, RuntimeError):
    """Settings or an environment that a capture refuses, with the reason."""


class CaptureOverflowError(CaptureError):
    """A finite teacher value that the chosen storage dtype cannot represent."""


class CacheError(DistillError, RuntimeError):
    """A cache that cannot be read or written as asked; the message says what and where."""


class StorageError(DistillError, RuntimeError):
    """A location that cannot be read or written as asked; the message names it and the cause."""


class StudentError(DistillError, ValueError):
    """A student that cannot be trained from this cache as configured."""
