"""What lets a student run stop and resume to the same result: its identity (the settings that must not
change), its state (model, optimiser, schedule, projections, each rank's RNG, the data position), the saved
model swapped in atomically, and metrics truncated back to the checkpoint's step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import distributed
from ..student_config import StudentConfig, StudentRunConfig
from ..errors import StudentError
from .mixing import upgrade_state
from .students import Student

STATE = Path("checkpoint") / "state.pt"  # in each student's output folder
SHARDED = "sharded-"  # parallel = fsdp: checkpoint/sharded-<step>/ holds the module's and optimiser's shards


# what "best" means and when a run stops: a resumed run that changed them would compare a restored best value
# with another metric (or other rows), never save a best model again, or stop at once
EVALUATION_KEYS = ("early_stopping_metric", "eval_rows", "eval_every", "patience")


@dataclass
class RunState:
    """Where a run stands, the same on every rank: optimiser steps done, tokens trained on (all ranks), seconds of
    training, and the training stream's position (`mixing.SourceMix.state`, shared with it). A checkpoint holds it
    as a dict."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stream: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        return cls(step=d["step"], tokens=d["tokens"], seconds=d["seconds"], stream=upgrade_state(d["stream"]))


def resume_identity(spec: StudentConfig, cfg: StudentRunConfig, sources: dict, world: int) -> dict:
    """What must not change between a run and its resumption, except that a cache may have grown
    (its new manifest descends from the checkpoint's) and max_steps may be raised: see `grown_sources`.
    The number of ranks may change when ranks x grad_accum (micro-batches per step) does not."""
    return {"student": spec.model_dump(mode="json"),
            "cache_digests": {name: c.manifest.digest for name, (c, _) in sources.items()},
            "micro_batches_per_step": cfg.grad_accum * world,
            **cfg.model_dump(mode="json", include={"batch_size", "max_steps", "seed", "num_workers", "sources", "cache",
                                                   "parallel", "mutual_weight", "mutual_temperature", "shuffle_window",
                                                   *EVALUATION_KEYS})}


def upgrade_identity(old: dict, sources: dict, new: dict | None = None) -> dict:
    """An identity written by an earlier version, in today's keys (the evaluation settings, which identities
    did not hold before, taken as `new`'s: they cannot be known)."""
    old = dict(old)
    for key in (*EVALUATION_KEYS, "shuffle_window"):  # (the data order of such a run is its state's scheme)
        if key not in old and new is not None and key in new:
            old[key] = new[key]
    if "cache_digest" in old:  # before multi-cache identities: its first source's digest
        old["cache_digests"] = {next(iter(sources)): old.pop("cache_digest")}
    if "tasks" in old:  # before the weighted caches were called sources
        old["sources"] = old.pop("tasks")
    old.setdefault("parallel", "ddp")  # before sharded students: every student was a whole replica
    if "grad_accum" in old:  # before DDP: one process
        old["micro_batches_per_step"] = old.pop("grad_accum")
    if isinstance(old.get("student"), dict):  # settings added since, at the value every earlier run had
        old["student"] = {"allow_biased_kd": False, "task": None, "tokenizer": None, **old["student"]}
    return old


def grown_sources(old: dict, new: dict, sources: dict) -> dict[str, bool] | None:
    """{source: whether its train split grew} for the sources whose cache grew since the checkpoint with
    identity `old`, when that and a raised max_steps are the only differences from `new`; None when
    the run cannot continue from `old`."""
    old = upgrade_identity(old, sources, new)
    if old == new:
        return {}
    if {k: v for k, v in old.items() if k not in ("cache_digests", "max_steps")} != \
            {k: v for k, v in new.items() if k not in ("cache_digests", "max_steps")}:
        return None
    if old.get("max_steps", 0) > new["max_steps"] or set(old.get("cache_digests", {})) != set(new["cache_digests"]):
        return None
    grew = {}
    for name, digest in old["cache_digests"].items():
        if digest != new["cache_digests"][name]:
            manifest = sources[name][0].manifest
            since = manifest.descends_from(digest)
            if since is None:
                return None
            grew[name] = any(g.rows.get("train") for g in manifest.grown[since:])
    return grew


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_model_atomically(model, tokenizer, d: Path) -> None:
    """`d` holds a complete model at every moment: written beside it, then swapped in by renames."""
    tmp = model_tmp(d)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    swap_in(d)


def model_tmp(d: Path) -> Path:
    """Where the next model of `d` is written before `swap_in`."""
    return d.with_name(d.name + ".tmp")


def swap_in(d: Path) -> None:
    """The complete model written at `model_tmp(d)` takes the place of `d` by two renames (`recover_model_dir` puts
    the previous one back if a run stops between them)."""
    old = d.with_name(d.name + ".old")
    if d.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(d, old)
    os.replace(model_tmp(d), d)
    shutil.rmtree(old, ignore_errors=True)


def recover_model_dir(d: Path) -> None:
    """A run stopped between the two renames of `save_model_atomically`: the previous model is put back."""
    old = d.with_name(d.name + ".old")
    if not d.exists() and old.exists():
        os.replace(old, d)
    shutil.rmtree(model_tmp(d), ignore_errors=True)


def append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to the checkpoint's: a resumed run writes the later ones again."""
    if not path.exists():
        return
    def kept(line: str) -> bool:
        try:
            rec = json.loads(line)
            return rec["step"] <= step and rec.get("split") != "test"  # a test record: written again at the end
        except (ValueError, KeyError):  # a line cut short by the kill
            return False

    keep = [x for x in path.read_text().splitlines() if x.strip() and kept(x)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def saved_layout(out: Path) -> str | None:
    """The `parallel` layout of the checkpoint in a student's output folder `out` (fsdp: its state is in a sharded
    folder beside state.pt), without reading it; None when there is none."""
    if not (out / STATE).exists():
        return None
    return "fsdp" if any((out / STATE.parent).glob(f"{SHARDED}*")) else "ddp"


def sharded_folder(step: int) -> Path:
    """Where a sharded student's state of `step` goes, relative to its output folder."""
    return STATE.parent / f"{SHARDED}{step:08d}"


def save_state(st: Student, run: RunState, rng: list, world: int, sharded: Path | None = None) -> None:
    """A student's whole state, written beside the checkpoint and renamed into place. `sharded`: the folder (relative
    to its output folder) that already holds its module's and optimiser's shards, which state.pt then names instead
    of holding them; older such folders are removed once state.pt names the new one."""
    path = st.out / STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    weights = {"sharded": sharded.name} if sharded is not None else {
        "model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
        "projections": st.module.projections.state_dict()}
    torch.save({**weights, "scheduler": st.sched.state_dict(), "run": run.to_dict(), "best": st.best,
                "best_step": st.best_step, "bad_evals": st.bad_evals, "stopped": st.stopped,
                "last_eval": st.last_eval, "best_eval": st.best_eval, "identity": st.identity, "rng": rng,
                "world_size": world}, tmp)
    os.replace(tmp, path)
    for old in path.parent.glob(f"{SHARDED}*"):
        if sharded is None or old.name != sharded.name:
            shutil.rmtree(old, ignore_errors=True)


def load_state(st: Student, sources: dict, ranks: distributed.Ranks
               ) -> tuple[RunState, dict[str, bool], Path | None]:
    """Restore a student from its checkpoint: (the run's position, {source: whether its train split grew} for the
    sources whose cache grew since, the folder of its sharded state or None). A sharded state (parallel = fsdp) is
    read by every rank afterwards (`parallel.load_sharded_state`). Refuses a checkpoint of other settings or of
    another shape."""
    path = st.out / STATE
    state = torch.load(path, map_location="cpu", weights_only=True)
    old, new = state.get("identity") or {}, st.identity
    grew = grown_sources(old, new, sources)
    if grew is None:
        old = upgrade_identity(old, sources, new)
        diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
                 and not (k == "max_steps" and new[k] >= (old.get(k) or 0))]  # raising it is fine
        evaluation = [f"{k} = {old.get(k)!r} there, {new.get(k)!r} here" for k in diffs if k in EVALUATION_KEYS]
        raise StudentError(f"{path} was written by a run with other settings ({', '.join(diffs)} differ"
                           + (f": {'; '.join(evaluation)}, which decide the best model and when the run stops"
                              if evaluation else "")
                           + "); resume with the same settings (a cache that grew by appends and a larger max_steps "
                           "are fine; ranks x grad_accum must stay), or choose another output_dir")
    sharded = path.parent / state["sharded"] if "sharded" in state else None
    try:
        if sharded is None:
            st.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise StudentError(
            f"{path} holds weights of another shape than student {st.name!r} ({str(e).splitlines()[-1].strip()}). "
            "A checkpoint written before FFN widths followed the teacher's ratio: set "
            "students[].arch.intermediate_size to its width (Llama's default was 11008)") from None
    if sharded is None:
        st.module.projections.load_state_dict(state["projections"])
        st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    st.best, st.best_step, st.bad_evals = state["best"], state["best_step"], state["bad_evals"]
    st.stopped, st.last_eval, st.best_eval = state["stopped"], state["last_eval"], state["best_eval"]
    rng = state.get("rng") or []
    if len(rng) == ranks.world:
        set_rng_state(rng[ranks.rank])
    if grew:  # the validation split may have grown too: earlier losses are not comparable, early stopping restarts
        st.best, st.best_step, st.bad_evals, st.stopped, st.best_eval = None, None, 0, False, {}
    return RunState.from_dict(state["run"]), grew, sharded
