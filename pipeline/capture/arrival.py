"""How rows arrive: in long runs of one label or one source file, which a student's shuffle window cannot mix.

Real data arrives grouped more often than not: files concatenated by source, a classification dataset written
class by class, an SFT mix by task. Without `data.shuffle_seed` the rows keep that order, so a shard, and a
student's shuffle window of a few shards (`shuffle_window`, `DEFAULT_SHUFFLE_WINDOW`), holds one group: its
batches swing from one label or source to the next. The capture (and its dry run) warns when that is likely:

- a sequence-classification split whose training rows come in runs of one gold label (measured on the rows);
- two or more local data files, each a run of rows, their lengths estimated from the files' sizes.

"Long" is a row-weighted mean run (the run a random row sits in) of at least a quarter of the default window's
rows: a window then spans four groups at most.
"""

from __future__ import annotations

import os

import numpy as np

from ..config import DEFAULT_SHUFFLE_WINDOW

WINDOW_SHARE = 4  # a run of window rows / this many rows or more is long


class Runs:
    """Run lengths of a sequence of values given in blocks (one value per row, in arrival order)."""

    def __init__(self):
        self.last, self.current, self.count, self.squares, self.rows, self.longest = None, 0, 0, 0, 0, 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values)
        if not len(v):
            return
        cuts = np.flatnonzero(v[1:] != v[:-1]) + 1  # where a new run starts within the block
        lengths = np.diff(np.concatenate([[0], cuts, [len(v)]]))
        if v[0] == self.last:  # the block's first run continues the open one
            self.current += int(lengths[0])
            lengths = lengths[1:]
        if len(lengths):
            self._close()
            for n in lengths[:-1].tolist():  # runs that end inside the block
                self.current = n
                self._close()
            self.last, self.current = v[-1].item(), int(lengths[-1])

    def _close(self) -> None:
        if self.current:
            self.count += 1
            self.squares += self.current ** 2
            self.rows += self.current
            self.longest = max(self.longest, self.current)
            self.current = 0

    def summary(self) -> dict | None:
        """{"runs", "rows", "typical" (row-weighted mean run), "longest"}; None when no row was seen."""
        self._close()
        if not self.rows:
            return None
        return {"runs": self.count, "rows": self.rows, "typical": self.squares / self.rows, "longest": self.longest}


def file_runs(files: list[str], rows: int) -> dict | None:
    """Runs of the rows of local `files` read in order, each file's share of `rows` taken from its size."""
    sizes = np.asarray([os.path.getsize(f) for f in files if os.path.isfile(f)], np.float64)
    if len(sizes) < 2 or sizes.sum() == 0 or rows == 0:
        return None
    per_file = rows * sizes / sizes.sum()
    return {"runs": len(sizes), "rows": rows, "typical": float((per_file ** 2).sum() / per_file.sum()),
            "longest": float(per_file.max())}


def grouping_warning(shuffle_seed: int | None, label_runs: dict | None, files: list[str], train_rows: int,
                     rows_per_shard: int) -> str | None:
    """The warning for rows that arrive in long runs (see the module doc), or None."""
    if shuffle_seed is not None:
        return None
    window = DEFAULT_SHUFFLE_WINDOW * rows_per_shard
    long = window / WINDOW_SHARE
    found = []
    if label_runs and label_runs["runs"] > 1 and label_runs["typical"] >= long:
        found.append(f"one label ({label_runs['runs']:,} runs over {label_runs['rows']:,} training rows, "
                     f"{label_runs['typical']:,.0f} rows each as a row sees it, the longest {label_runs['longest']:,})")
    by_file = file_runs(files, train_rows)
    if by_file and by_file["typical"] >= long:
        found.append(f"one source file ({by_file['runs']:,} files read in order, about {by_file['typical']:,.0f} "
                     "rows each as a row sees it, from their sizes)")
    if not found:
        return None
    return (f"warning: rows arrive in long runs of {' and of '.join(found)}, and data.shuffle_seed is not set. A "
            f"student shuffles rows within a window of {DEFAULT_SHUFFLE_WINDOW} shards ({window:,} rows here), so "
            "its batches would hold few groups at a time and its loss swing between them: set data.shuffle_seed "
            "(e.g. 0) to shuffle the documents before rows are cut, or train with a shuffle_window that spans "
            "several groups")


def warn_if_grouped(data, prepared, rows_per_shard: int, log) -> str | None:
    """Log (and return) `grouping_warning` for a preparation of settings `data` (a `DataConfig`)."""
    from ..config import LOCAL_LOADERS
    from .documents import expand_data_files

    files = expand_data_files(data) if data.source in LOCAL_LOADERS else []
    train = prepared.splits.get("train")
    warning = grouping_warning(data.shuffle_seed, prepared.label_runs, files, train.rows if train else 0,
                               rows_per_shard)
    if warning:
        log(warning)
    return warning
