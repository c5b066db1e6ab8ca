"""Pass 1 of `distill import`: every row of the source checked before anything is written, and what it holds.

`survey` reads the source once (`imported.blocks`): ids within the teacher's vocabulary, log-probs finite and their
per-position sums at most 1, the entries per trained position (K) fixed or marked by a mask, nothing at a row's
first position, rows no longer than `seq_len`. It learns the largest K every trained position holds, whether the
log-probs are normalised over the whole vocabulary (some position's top-K mass is below 1) or were renormalised
over the K ids given (every position sums to 1), whether the logsumexp and the log-prob of every trained token are
known, the mass of each rank, and per split how often the token at each shift from a position is among its
entries (`alignment_hits`). `decide` turns that into the manifest's `imported` section, refusing a source whose
targets do not line up with the tokens they predict (`check_alignment`). `ImportSettings` is what the user asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import Strict
from ..errors import DataError
from ..format.distillkit import Compression
from ..format.storage import Storage
from .imported import blocks
from .layouts import Block
from .rowfiles import KeyStore
from .rows import content_key

SHIFTS = (-1, 0, 1)  # the alignment check: the token at each shift from a position among its entries
SUM_TOL = 5e-3  # a position's probabilities may sum to 1 + this (float16 log-probs), no more
RENORM_TOL = 1e-3  # every position within this of 1: the log-probs were renormalised over the ids given
FLOAT16_LOWEST = float(np.finfo(np.float16).min)  # below it (-inf, masked logits' -1e9): probability 0


class ImportSettings(Strict):
    """What the user asked of `distill import` (its command line, by keyword)."""

    source: str
    out: str
    teacher: str  # named by the user: a hub id or folder whose config and tokenizer can be read (no weights)
    tokenizer: str | None = None  # default: the teacher's
    layout: str | None = None  # "axolotl", "vllm" or "distillkit"; None: detected
    split: str | None = None  # the split a flat source becomes (default train), or the one split folder imported
    temperature: float = 1.0  # the temperature the log-probs were computed at
    top_k: int | None = None  # keep this many entries per position (default: the most every trained one holds)
    seq_len: int | None = None  # default: the longest row
    vocab_size: int | None = None  # default: the teacher config's (LM-head rows), else the tokenizer's length
    rows_per_shard: int = 64
    rows_per_chunk: int = 8
    overwrite: bool = False
    check_alignment: bool = True  # refuse a source whose targets do not sit where its layout says (`check_alignment`)


@dataclass
class Survey:
    """What pass 1 learnt of the source."""

    layout: str | None = None
    files: dict = field(default_factory=dict)  # split -> its files
    rows: dict = field(default_factory=dict)  # split -> rows kept
    tokens: dict = field(default_factory=dict)
    duplicates: int = 0
    rows_read: int = 0
    longest: int = 0
    positions: int = 0  # trained target positions
    k_min: int | None = None  # real entries at a trained position, fewest
    k_max: int = 0
    listed: tuple = (1 << 62, 0)  # entries a trained position lists (real or not), fewest and most
    masked: bool = True
    below_one: int = 0  # trained positions whose entries sum below 1 - RENORM_TOL
    rank_mass: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [j]: the j-th largest entries' probability
    #                                                                     summed over trained positions
    alignment: dict = field(default_factory=dict)  # split -> (len(SHIFTS), 2) [hits, positions] (`alignment_hits`)
    empty_at: str | None = None  # the first trained position without a real entry
    documents: bool = False  # some row holds several documents (position ids restart inside it): document_mask
    compression: Compression | None = None  # the distillkit layout: its compression (one for the whole source)
    lse: bool = True
    label: bool = True

    def mean_mass(self, k: int) -> float:
        """The mean probability of a trained position's k most likely entries (what the cache keeps)."""
        return float(self.rank_mass[:k].sum()) / max(self.positions, 1)


@dataclass
class Targets:
    """One block's per-position facts, positions flat (see `Block`)."""

    target: np.ndarray  # (T,) a trained position with a distribution (not a row's first)
    counts: np.ndarray  # (T,) real entries
    sums: np.ndarray  # (T,) their probabilities summed
    label_lp: np.ndarray  # (T,) log p of the position's own token (NaN: not known)
    owner: np.ndarray  # (E,) the position of each entry
    valid: np.ndarray  # (E,) a real, finite entry


def targets(b: Block) -> Targets:
    T = len(b.tokens)
    owner = np.repeat(np.arange(T), np.diff(b.entry_starts))
    lp = b.e_lp
    bad = b.e_valid & (np.isnan(lp) | (lp > 0))  # +inf too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{b.where(int(owner[i]))}: log-prob {lp[i]} (log-probs are finite and at most 0)")
    # probability 0 (exp underflows long before float16's lowest value, which the cache stores): not an entry
    valid = b.e_valid & (lp >= FLOAT16_LOWEST)
    target = b.trained.copy()
    target[b.starts[:-1][np.diff(b.starts) > 0]] = False  # a row's first token has no distribution
    counts = np.bincount(owner[valid], minlength=T)
    if b.masked:  # a position whose entries are all masked has no target
        target &= counts > 0
    sums = np.bincount(owner[valid], weights=np.exp(lp[valid]), minlength=T)
    label_lp = np.full(T, np.nan)
    own = valid & (b.e_ids == b.tokens[owner])
    label_lp[owner[own]] = lp[own]
    if b.label_lp is not None:
        label_lp = np.where(np.isfinite(b.label_lp), b.label_lp, label_lp)
    return Targets(target, counts, sums, label_lp, owner, valid)


def ranked(t: Targets, b: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real entries of trained positions, most likely first within each position (ties in the source's order):
    (entry indices, their positions, their ranks). Sorted a row of a (positions, most entries) grid at a time,
    which is several times faster than one sort of (position, log-prob) pairs."""
    T, E = len(b.tokens), len(b.e_lp)
    width = int(np.diff(b.entry_starts).max(initial=0))
    if not E or not width:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    chosen = t.valid & t.target[t.owner]
    col = np.arange(E) - b.entry_starts[t.owner]
    value = np.full((T, width), np.inf)  # sorted ascending: -log-prob, entries not chosen last
    value[t.owner, col] = np.where(chosen, -b.e_lp, np.inf)
    index = np.full((T, width), -1, np.int64)
    index[t.owner, col] = np.arange(E)
    by_rank = np.argsort(value, axis=1, kind="stable")
    keep = np.take_along_axis(value, by_rank, 1) < np.inf
    order = np.take_along_axis(index, by_rank, 1)[keep]
    own, rank = np.nonzero(keep)  # row-major: positions in order, ranks 0, 1, ... within each
    return order, own, rank


def alignment_hits(b: Block, t: Targets) -> np.ndarray:
    """(len(SHIFTS), 2): per shift s, [trained positions p whose row's token p + s is among p's real entries,
    trained positions p with a token p + s in the row]. In a source aligned as it says, shift 0 (the token the
    position predicts) hits far more often than the tokens beside it."""
    T = len(b.tokens)
    row = np.repeat(np.arange(b.rows), np.diff(b.starts))
    pos = np.flatnonzero(t.target)
    entry = np.flatnonzero(t.valid & t.target[t.owner])
    out = np.zeros((len(SHIFTS), 2), np.int64)
    for i, shift in enumerate(SHIFTS):
        q = pos + shift
        counted = (q >= 0) & (q < T)
        counted[counted] = row[q[counted]] == row[pos[counted]]
        qe = t.owner[entry] + shift
        inside = (qe >= 0) & (qe < T)
        match = np.zeros(len(entry), bool)
        match[inside] = (row[qe[inside]] == row[t.owner[entry[inside]]]) & \
            (b.e_ids[entry[inside]] == b.tokens[qe[inside]])
        hit = np.zeros(T, bool)
        hit[t.owner[entry[match]]] = True
        out[i] = hit[pos[counted]].sum(), counted.sum()
    return out


def shares(hits: np.ndarray) -> dict[str, float]:
    """{"-1": share, "0": share, "+1": share} of `alignment_hits` totals."""
    return {f"{s:+d}" if s else "0": float(h / n) if n else 0.0 for s, (h, n) in zip(SHIFTS, hits)}


ALIGNMENT_MARGIN = 0.2  # shift 0 must hit at least this share of positions more than either neighbour


def check_alignment(source: str, alignment: dict[str, np.ndarray]) -> None:
    """Refuse a split whose targets do not sit where the layout says: the token each position predicts must be
    among its entries clearly more often than the tokens one step before or after it (`ALIGNMENT_MARGIN`)."""
    for split, hits in alignment.items():
        if not hits[1][1]:  # no trained position in this split (every row a duplicate of another split's)
            continue
        share = shares(hits)
        best = max(share, key=share.get)
        if share["0"] >= max(share["-1"], share["+1"]) + ALIGNMENT_MARGIN:
            continue
        seen = ", ".join(f"shift {k}: {v:.1%}" for k, v in share.items())
        if best == "+1":
            why = ("the entries at position t hold the distribution that predicts token t + 1 (the layout of "
                   "DistillKit, of logits[:, t] and of this project's caches): move every position's targets one "
                   "position later, or import it with --layout distillkit when it is DistillKit's")
        elif best == "-1":
            why = "the entries at position t predict token t - 1: the targets were moved one position too late"
        else:
            why = ("no shift stands out: the log-probs may come from another teacher or tokenizer than the rows' "
                   "token ids, or from a teacher whose top entries rarely hold the next token")
        raise DataError(f"{source} split {split}: the targets do not line up with the tokens they predict "
                        f"(share of {int(hits[1][1]):,} trained positions whose token at each shift is among "
                        f"their entries: {seen}); {why}")


def in_order(splits: dict[str, list[str]]) -> list[str]:
    """The splits as both passes take them: held-out ones first, so that a training row equal to a held-out one
    is the one dropped (as the capture does)."""
    return sorted(splits, key=lambda split: split == "train")


def survey(s: ImportSettings, st: Storage, splits: dict[str, list[str]], vocab: int, scratch: Path) -> Survey:
    """Pass 1: check every row, learn K, the normalisation and what is known (see the module doc)."""
    out = Survey(files=splits)
    keys = KeyStore(scratch / "survey.sqlite")  # a row is kept once in the whole cache
    for split in in_order(splits):
        rows = tokens = 0
        for b in blocks(st, splits[split], s.layout or out.layout):
            if out.layout and b.layout != out.layout:
                raise DataError(f"{b.file}: {b.layout} layout, where the files before it are {out.layout}'s: "
                                "import one layout at a time")
            out.layout = b.layout
            if b.compression is not None:
                if out.compression is not None and out.compression != b.compression:
                    raise DataError(f"{b.file}: compressed with other settings than the files before it "
                                    f"({b.compression.describe()}): import one compression at a time")
                out.compression = b.compression
            t = targets(b)
            _check_block(s, b, t, vocab)
            out.rows_read += b.rows
            n = np.diff(b.starts)
            out.longest = max(out.longest, int(n.max(initial=0)))
            kept = np.asarray([keys.add(content_key(b.tokens[b.starts[r]:b.starts[r + 1]]), "main")
                               for r in range(b.rows)], bool)
            rows, tokens = rows + int(kept.sum()), tokens + int(n[kept].sum())
            out.duplicates += int((~kept).sum())
            # the statistics of the rows the cache keeps (a duplicate row is read, checked, and not counted again)
            kept_positions = np.repeat(kept, n)
            t = replace(t, target=t.target & kept_positions)
            k = t.counts[t.target]
            if out.empty_at is None and (k == 0).any():
                out.empty_at = b.where(int(np.flatnonzero(t.target & (t.counts == 0))[0]))
            if len(k):
                out.k_min = int(k.min()) if out.k_min is None else min(out.k_min, int(k.min()))
                out.k_max = max(out.k_max, int(k.max()))
                listed = np.diff(b.entry_starts)[t.target]  # as the source lists them (-inf entries included)
                out.listed = (min(out.listed[0], int(listed.min())), max(out.listed[1], int(listed.max())))
            out.masked &= b.masked
            out.positions += int(t.target.sum())
            out.below_one += int((t.sums[t.target] < 1 - RENORM_TOL).sum())
            order, _, rank = ranked(t, b)
            by_rank = np.bincount(rank, weights=np.exp(b.e_lp[order]))
            n_ranks = max(len(by_rank), len(out.rank_mass))
            out.rank_mass = np.pad(out.rank_mass, (0, n_ranks - len(out.rank_mass))) + \
                np.pad(by_rank, (0, n_ranks - len(by_rank)))
            out.alignment[split] = out.alignment.get(split, 0) + alignment_hits(b, t)
            if b.positions is not None:
                restart = b.positions == 0
                restart[b.starts[:-1][n > 0]] = False  # a row's own start
                out.documents |= bool((restart & kept_positions).any())
            out.lse &= b.lse is not None and bool(np.isfinite(b.lse[t.target]).all())
            out.label &= bool(np.isfinite(t.label_lp[t.target]).all())
        out.rows[split], out.tokens[split] = rows, tokens
    keys.close()
    return out


def _check_block(s: ImportSettings, b: Block, t: Targets, vocab: int) -> None:
    """Refuse ids outside the vocabulary, sums above 1, rows over seq_len."""
    for name, ids, where in (("token id", b.tokens, np.arange(len(b.tokens))),
                             ("target id", b.e_ids[t.valid], t.owner[t.valid])):
        wrong = (ids < 0) | (ids >= vocab)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise DataError(f"{b.where(int(where[i]))}: {name} {int(ids[i])} is outside the teacher's vocabulary "
                            f"(0..{vocab - 1}): the source was made with another tokenizer or vocabulary")
    real = np.flatnonzero(t.valid)
    pairs = np.lexsort((b.e_ids[real], t.owner[real]))  # (position, id) in order: a repeat sits next to its twin
    own, ids = t.owner[real][pairs], b.e_ids[real][pairs]
    twice = (own[1:] == own[:-1]) & (ids[1:] == ids[:-1])
    if twice.any():
        i = int(np.flatnonzero(twice)[0])
        raise DataError(f"{b.where(int(own[i]))}: target id {int(ids[i])} appears twice among the position's entries")
    over = t.target & (t.sums > 1 + SUM_TOL)
    if over.any():
        i = int(np.flatnonzero(over)[0])
        raise DataError(f"{b.where(i)}: the entries' probabilities sum to {t.sums[i]:.4f} > 1: these are not "
                        "log-probabilities of one distribution (logits? another temperature's values?)")
    n = np.diff(b.starts)
    firsts = b.starts[:-1][n > 0]
    early = np.flatnonzero(t.counts[firsts])
    if len(early):
        r = int(np.flatnonzero(n > 0)[early[0]])
        raise DataError(f"{b.file} row {b.first_row + r} position 0: real target entries at a row's first position, "
                        "which predicts no token of the row (the layout puts the distribution that predicts token t "
                        "at position t: position 0 holds none, -inf log-probs or a target_mask of 0). The targets "
                        "look shifted one position early: DistillKit's layout and logits[:, t] store a distribution "
                        "at the position that computes it (import DistillKit's files with --layout distillkit, or "
                        "move every target one position later)")
    if (n == 0).any():
        raise DataError(f"{b.file} row {b.first_row + int(np.flatnonzero(n == 0)[0])}: no tokens")
    if s.seq_len and (n > s.seq_len).any():
        r = int(np.flatnonzero(n > s.seq_len)[0])
        raise DataError(f"{b.file} row {b.first_row + r}: {int(n[r])} tokens > seq_len {s.seq_len}; rows are "
                        "imported whole (raise seq_len)")


def decide(s: ImportSettings, sv: Survey, vocab: int) -> dict:
    """The `imported` section: K, the normalisation, what is known; refuses what cannot be imported faithfully."""
    where = s.source
    if sv.positions == 0:
        raise DataError(f"{where}: no trained position with targets (every label is -100, or rows are single tokens)")
    if sv.listed[0] != sv.listed[1] and not sv.masked:
        raise DataError(f"{where}: positions list {sv.listed[0]} to {sv.listed[1]} target entries and there is no "
                        "target_mask saying which are real: ragged top-K needs a mask (axolotl's target_mask)")
    if s.check_alignment:
        check_alignment(where, sv.alignment)
    if sv.k_min == 0:
        raise DataError(f"{sv.empty_at}: a trained position holds no real target entry (all -inf): mark positions "
                        "without targets untrained (labels -100, or a target_mask of 0)")
    k = s.top_k if s.top_k is not None else sv.k_min
    if k < 1 or k > sv.k_min:
        raise DataError(f"{where}: top_k {k}: every trained position holds at least {sv.k_min} entries (at most "
                        f"{sv.k_max}); choose 1..{sv.k_min}")
    if s.temperature != 1.0 and not sv.lse:
        raise DataError(f"{where}: log-probs at temperature {s.temperature} without their logsumexp "
                        "(target_logsumexp): the logits cannot be recovered, and the cache keeps them; give "
                        "the logsumexp column, or import log-probs taken at temperature 1")
    renormalised = sv.below_one == 0 and sv.k_max < vocab
    return {"layout": sv.layout, "source": s.source, "files": sv.files, "top_k": k,
            "normalised": "top-k" if renormalised else "vocabulary",
            # the teacher's own NLL only: not from renormalised values, nor from another temperature's
            "logsumexp": sv.lse, "target_logprob": sv.label and not renormalised and s.temperature == 1.0,
            "temperature": s.temperature, "entries": [sv.k_min, sv.k_max],
            "mean_mass": sv.mean_mass(k), "rows_read": sv.rows_read, "duplicate_rows": sv.duplicates,
            "alignment": {split: shares(hits) for split, hits in sv.alignment.items()},
            "alignment_checked": s.check_alignment,
            **({"compression": sv.compression.to_dict(), "exact_entries": min(k, sv.compression.exact_ranks)}
               if sv.compression else {})}
