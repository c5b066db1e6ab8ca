"""`distill onpolicy`: rounds of generate -> score -> train, and `distill redistill`: new documents -> train.

On-policy round r (of `rounds`):

1. **generate**: the student of round r - 1 (round 1: `start`) samples completions for the prompts, with
   seed sampling.seed + r, into dir/round-00r/samples (token ids, `generate`).
2. **score**: the teacher captures them (data.format = "tokens", loss on the completions only) into the
   round's cache, cache_dir/round-00r: a plain teacher cache whose manifest records the generator and
   the round (dataset.generation).
3. **train**: the student continues from the generator's weights on the offline caches and the rounds'
   caches as weighted sources; dir/round-00r/student.toml is the exact `distill student` settings it ran,
   so the round can be re-run, or inspected, with the ordinary command.
4. **evaluate** (optional, `eval_prompts`): the new student samples held-out prompts (a fixed seed), the
   teacher scores them, and the teacher's NLL per completion token is recorded: how likely the
   teacher finds what the student writes.

Each step finds its own finished output and skips it; a step that was killed resumes by its own
mechanism (missing sample parts, uncommitted shards, the student's checkpoint). `report.json` in dir
holds every finished round: its artifacts, the seconds of each step, the teacher's NLL of the round's
samples. Before any work, the generator's tokenizer, the offline caches and any existing round cache
are checked against the teacher.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import distributed, models
from ..config import CaptureConfig, DataConfig, OutputConfig, TeacherCacheConfig
from ..student_config import StudentRunConfig
from ..errors import CacheError, ConfigError, DataError, StudentError
from ..format.layout import row_column, tokenizer_fingerprint
from ..format.reader import Cache
from .generate import check_causal_lm, check_same_tokenizer, run_generate
from .samples import OtherSettings, identical_draws, read_samples
from .settings import GenerateConfig, GeneratorConfig, OnPolicyConfig, SamplesOutputConfig, dump_toml

REPORT = "report.json"
EVAL_SEED = 1_000_003  # the held-out samples' seed: every round's student is evaluated on the same draws


@dataclass(frozen=True)
class RoundPaths:
    folder: Path  # dir/round-00r
    samples: Path
    cache: str
    student_out: Path
    student: str  # the student's name: its folder in student_out
    eval_samples: Path
    eval_cache: Path

    @property
    def model(self) -> Path:
        return self.student_out / self.student / "model"

    @property
    def student_report(self) -> Path:
        return self.student_out / self.student / "report.json"


def round_paths(cfg: OnPolicyConfig, r: int) -> RoundPaths:
    folder = Path(cfg.dir) / f"round-{r:03d}"
    caches = cfg.cache_dir if cfg.cache_dir is not None else str(Path(cfg.dir) / "caches")
    return RoundPaths(folder, folder / "samples", f"{caches.rstrip('/')}/round-{r:03d}", folder / "students",
                      cfg.student_name,
                      folder / "eval-samples", folder / "eval-cache")


def teacher_nll(cache: Cache, split: str = "train") -> dict:
    """The teacher's NLL per scored token (-target_logprob where the loss mask is 1): for scored samples, how
    likely the teacher finds what the generator wrote (lower is better). Read a shard at a time."""
    total, n = 0.0, 0
    masked = "loss_mask" in cache.manifest.fields
    if cache.manifest.splits[split].rows:
        for part, rows, a in cache.shard_rows(split, ["loss_mask", "length"] if masked else ["length"]):
            lp = np.asarray(cache.array_part(split, part, "target_logprob")[a:a + rows.num_rows], np.float64)
            if masked:
                m = row_column(rows, "loss_mask", bool)
            else:  # every real position but the last, whose next token is not in the row
                m = np.arange(lp.shape[1])[None, :] < (rows.column("length").to_numpy()[:, None] - 1)
            total -= float(lp[m].sum())
            n += int(m.sum())
    return {"teacher_nll": total / n if n else None, "tokens": n}


def scoring_capture(cfg: OnPolicyConfig) -> CaptureConfig:
    """How the teacher scores the samples: cfg.capture, or the target settings of the first offline cache (its
    top-K, temperatures, sampled targets, final hidden state and codecs; no hidden states or attention maps)."""
    if cfg.capture is not None:
        return cfg.capture
    m = Cache(cfg.offline[0].cache, storage_options=cfg.storage_options).manifest
    c = m.capture
    keys = ("top_k", "samples", "sample_temperature", "sample_seed", "final_hidden", "final_hidden_dtype",
            "topk_codec", "compression_level", "logprob_precision",
            "topk_ids_encoding")
    taken = {k: c.value(k) for k in keys}
    taken["temperatures"] = [t for t in c.value("temperatures_all") if t != 1.0]
    return CaptureConfig.model_validate({k: list(v) if isinstance(v, tuple) else v for k, v in taken.items()})


def _check_fields(cfg: OnPolicyConfig, capture: CaptureConfig) -> None:
    """The student's terms must find their fields in the rounds' caches (before any sampling)."""
    from ..format.specs import field_specs
    from ..train import terms

    have = {s.name for s in field_specs(seq_len=8, top_k=capture.top_k, n_temperatures=len(capture.temperatures),
                                        hidden=(len(capture.hidden_layers), 8) if capture.hidden_layers else None,
                                        hidden_dtype=capture.hidden_dtype,
                                        attention=(len(capture.attention_layers), 1) if capture.attention_layers
                                        else None, samples=capture.samples,
                                        final_hidden=(8, capture.final_hidden_dtype) if capture.final_hidden
                                        else None)}
    have |= {"input_ids", "length", "key", "loss_mask"}
    spec = cfg.round_student_config(1, [("x", "x", 1.0)], Path(cfg.dir)).students[0]
    for t in terms.active(spec):
        missing = [f for f in t.on("causal-lm").fields if f not in have]
        if missing:
            raise ConfigError(f"student loss {t.name} reads {missing}, which the rounds' caches will not hold with "
                              "these capture settings: set them in [capture] (or drop the term)")


def check_before_work(cfg: OnPolicyConfig, log) -> CaptureConfig:
    """Everything that can fail without sampling: the teacher's tokenizer against the start model's, the start
    model is a causal LM, the offline caches and any existing round cache come from this teacher, the
    student's terms find their fields. Returns the scoring capture settings."""
    teacher_tok = models.load_tokenizer(cfg.teacher)
    fp, weights = tokenizer_fingerprint(teacher_tok), models.weights_fingerprint(cfg.teacher)
    if models.missing_local_path(cfg.start) is not None:
        raise ConfigError(f"start model {cfg.start} does not exist: round 1 needs a student to sample (a saved "
                          "student's model/ folder: train one with distill student first)")
    start = _generator(cfg, cfg.start)
    start_config = models.load_model_config(start)
    check_causal_lm(start, start_config)
    check_same_tokenizer(models.load_tokenizer(start), teacher_tok, f"start model {cfg.start!r}", cfg.teacher.model)
    for t in cfg.offline:
        _check_cache_teacher(Cache(t.cache, storage_options=cfg.storage_options), f"offline cache {t.name!r}", fp,
                             weights, cfg)
    for r in range(1, cfg.rounds + 1):
        c = _finished_cache(round_paths(cfg, r).cache, cfg.storage_options)
        if c is not None:
            _check_cache_teacher(c, f"round {r}'s cache", fp, weights, cfg)
    if cfg.eval_prompts is not None:
        _check_held_out(cfg, teacher_tok)
    capture = scoring_capture(cfg)
    _check_fields(cfg, capture)
    if cfg.student.get("losses", {}).get("ce", 0) > 0:
        log("warning: student.losses has ce: on the rounds' rows its targets are the student's own samples, so it "
            "trains the student to repeat itself; the on-policy signal is the teacher's distribution (kd_reverse, "
            "kd_jsd, kd_forward); keep ce for the offline rows only by leaving it out here")
    return capture


def _check_held_out(cfg: OnPolicyConfig, tokenizer) -> None:
    """Refuse eval_prompts that share a prompt (as token ids, rendered as sampled) with the training prompts: the
    held-out teacher NLL would measure prompts the student trains on."""
    from ..capture.rows import content_key

    train = {content_key(ids): i for i, ids in zip(*_prompt_ids(cfg.prompts, cfg, tokenizer))}
    index, ids = _prompt_ids(cfg.eval_prompts, cfg, tokenizer)
    shared = [(i, train[content_key(x)]) for i, x in zip(index, ids) if content_key(x) in train]
    if shared:
        raise ConfigError(f"eval_prompts share {len(shared)} of their {len(ids)} prompts with prompts (eval prompt "
                          f"{shared[0][0]} is prompt {shared[0][1]}): the held-out teacher NLL would be measured on "
                          "prompts the student trains on; leave them out of eval_prompts")


def _prompt_ids(prompts: DataConfig, cfg: OnPolicyConfig, tokenizer) -> tuple[list[int], list[np.ndarray]]:
    """(dataset index, token ids) of every prompt `prompts` gives, as the loop samples them."""
    from .generate import load_prompts

    got = load_prompts(prompts, cfg.sampling, tokenizer)
    return got.index, got.ids


def _check_cache_teacher(c: Cache, what: str, fp: str, weights: str | None, cfg: OnPolicyConfig) -> None:
    m = c.manifest
    if m.tokenizer.fingerprint != fp:
        raise CacheError(f"{what} ({c.root}) was made with another tokenizer than the teacher {cfg.teacher.model!r}'s")
    theirs = m.teacher.weights_sha256
    if m.imported is not None and (m.teacher.model != cfg.teacher.model or m.imported.temperature != 1.0):
        raise CacheError(f"{what} ({c.root}) was imported with the teacher named {m.teacher.model!r} at temperature "
                         f"{m.imported.temperature}: the rounds score with {cfg.teacher.model!r} at 1, and an imported "
                         "cache has no weights to compare; name the same teacher when importing")
    if weights is not None and theirs is not None and theirs != weights:
        raise CacheError(f"{what} ({c.root}) was made by another teacher ({m.teacher.model}, weights sha256 "
                         f"{theirs[:16]}...) than {cfg.teacher.model!r} ({weights[:16]}...): the rounds' targets and "
                         "the offline targets must come from one teacher (a new teacher needs a new run dir)")


def _finished_cache(where: str, storage_options: dict) -> Cache | None:
    try:
        return Cache(where, storage_options=storage_options)
    except CacheError:
        return None  # none yet, or unfinished (the capture resumes it)


def _generator(cfg: OnPolicyConfig, model: str):
    t = cfg.teacher
    return GeneratorConfig(model=str(model), dtype=t.dtype, device=t.device, trust_remote_code=t.trust_remote_code)


class Loop:
    """The rounds of one on-policy run (one process, or every rank of a torchrun launch alike)."""

    def __init__(self, cfg: OnPolicyConfig, log: Callable[[str], None] = print, progress: bool = True,
                 hooks: dict[str, Callable] | None = None):
        self.cfg, self.log, self.progress = cfg, log, progress
        self.hooks = hooks or {}  # "after": (round, step) after each step; "generate_part", "train_step": inner
        self.dir = Path(cfg.dir)
        self.ranks = distributed.setup()
        if not self.ranks.main:
            self.log, self.progress = (lambda m: None), False

    def run(self) -> dict:
        cfg = self.cfg
        self.capture = distributed.all_agree(lambda: check_before_work(cfg, self.log))
        if self.ranks.main:
            self.dir.mkdir(parents=True, exist_ok=True)
        report = self._report()
        for r in range(1, cfg.rounds + 1):
            entry = report["rounds"].get(str(r), {})
            if entry.get("status") == "finished":
                continue
            self.log(f"round {r} of {cfg.rounds}")
            entry = self.round(r, entry)
            report["rounds"][str(r)] = entry
            self._save(report)
        return report

    def _report(self) -> dict:
        path = self.dir / REPORT
        doc = json.loads(path.read_text()) if path.is_file() else {"rounds": {}}
        doc["settings"] = self.cfg.model_dump(mode="json")
        return doc

    def _save(self, report: dict) -> None:
        if self.ranks.main:
            tmp = self.dir / (REPORT + ".tmp")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            os.replace(tmp, self.dir / REPORT)

    @contextmanager
    def _step(self, r: int, name: str, seconds: dict):
        """One step of round r: its seconds (those of the run that finished it) and the `after` hook."""
        t0 = time.perf_counter()
        yield
        seconds.setdefault(name, round(time.perf_counter() - t0, 2))
        if "after" in self.hooks:
            self.hooks["after"](r, name)

    def round(self, r: int, entry: dict) -> dict:
        cfg, p = self.cfg, round_paths(self.cfg, r)
        generator = cfg.start if r == 1 else str(round_paths(cfg, r - 1).model)
        seconds = entry.setdefault("seconds", {})
        entry.update({"generator": generator, "samples": str(p.samples), "cache": p.cache})
        with self._step(r, "generate", seconds):
            samples = self.generate(generator, p.samples, cfg.prompts, cfg.sampling.seed + r, r)
            entry["samples_statistics"] = samples["statistics"]
        with self._step(r, "score", seconds):
            cache = self.score(p.samples, p.cache, cfg.storage_options)
            entry["samples_teacher_nll"] = teacher_nll(cache)  # of the generator's completions on training prompts
            # rows are keyed by (prompt, sample): a completion drawn twice is two rows, scored and trained as drawn
            entry["identical_samples"] = identical_draws(p.samples)
        with self._step(r, "train", seconds):
            entry["student"] = self.train(r, generator, p)
            entry["model"] = str(p.model)
        if cfg.eval_prompts is not None:
            with self._step(r, "evaluate", seconds):
                entry["eval"] = self.evaluate(str(p.model), p.eval_samples, p.eval_cache)
        entry["settings"] = cfg.model_dump(mode="json")  # what this round ran with (a later run may change them)
        entry["status"] = "finished"
        return entry

    # -- the steps --------------------------------------------------------------------------
    def generate(self, model: str, out: Path, prompts: DataConfig, seed: int, r: int | None) -> dict:
        cfg = self.cfg
        gcfg = GenerateConfig(generator=_generator(cfg, model), prompts=prompts,
                              sampling=cfg.sampling.model_copy(update={"seed": seed}),
                              output=SamplesOutputConfig(dir=str(out)), round=r)
        try:
            res = run_generate(gcfg, log=self.log, progress=self.progress, after_part=self.hooks.get("generate_part"))
        except OtherSettings:
            raise ConfigError(f"{out} holds samples made with other settings than this run's (round {r}): finish "
                              "the run with the settings it started with, or start a new run in another dir") from None
        return res.plan

    def score(self, samples: Path, where: str, storage_options: dict) -> Cache:
        from ..capture.run import run_capture

        cfg = self.cfg
        read_samples(samples)  # finished, or refused
        # every draw its own row: two identical completions of a prompt are both trained on and both evaluated
        data = DataConfig(source="parquet", data_files=[str(samples / "part-*.parquet")], format="tokens",
                          loss_mask="assistant", packing=False, seq_len=cfg.prompts.seq_len, bos=cfg.prompts.bos,
                          validation_fraction=0.0, key_columns=["prompt_index", "sample"])
        ccfg = TeacherCacheConfig(teacher=cfg.teacher, data=data, capture=self.capture,
                                  output=OutputConfig(dir=where, storage_options=storage_options))
        run_capture(ccfg, log=self.log, progress=self.progress)
        return Cache(where, storage_options=storage_options)

    def round_sources(self, r: int) -> list[tuple[str, str, float]]:
        cfg = self.cfg
        sources = [(t.name, t.cache, t.weight) for t in cfg.offline]
        rounds = list(range(1, r + 1)) if cfg.history == "all" else [r]
        sources += [(f"round-{k:03d}", round_paths(cfg, k).cache, cfg.onpolicy_weight / len(rounds)) for k in rounds]
        return sources

    def train(self, r: int, generator: str, p: RoundPaths) -> dict:
        from ..train.recipe import train_students

        scfg = self.cfg.round_student_config(r, self.round_sources(r), p.student_out, model=generator)
        if self.ranks.main:
            write_student_settings(p.folder, scfg, "this round, as the on-policy loop ran them")
        if _report_of(p.student_report) is None:  # none yet (or cut short): the run resumes from its checkpoint
            train_students(scfg, log=self.log, progress=self.progress, after_step=self.hooks.get("train_step"))
        distributed.all_gather(None)
        report = _report_of(p.student_report)
        if report is None:
            raise StudentError(f"round {r}: the student run finished without a readable {p.student_report}")
        return {k: report.get(k) for k in ("best_step", "best", "steps", "final", "sources") if k in report}

    def evaluate(self, model: str, samples: Path, cache: Path) -> dict:
        cfg = self.cfg
        self.generate(model, samples, cfg.eval_prompts, EVAL_SEED + cfg.sampling.seed, None)
        return teacher_nll(self.score(samples, str(cache), {}))


def write_student_settings(folder: Path, scfg: StudentRunConfig, what: str) -> None:
    """folder/student.toml: the `distill student` settings that ran, which that command runs again."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "student.toml").write_text(f"# the `distill student` settings of {what}\n"
                                         + dump_toml(scfg.model_dump(mode="json", exclude_defaults=True)))


def _report_of(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_onpolicy(cfg: OnPolicyConfig, log: Callable[[str], None] = print, progress: bool = True,
                 hooks: dict[str, Callable] | None = None) -> dict:
    """All rounds of `cfg` (resumed where a previous run stopped); the run's report."""
    return Loop(cfg, log, progress, hooks).run()


# ---------------------------------------------------------------------------------------------
# continuous re-distillation: new documents


def redistill(cache_config: TeacherCacheConfig, student_config: StudentRunConfig, data_files: list[str],
              out: Path, previous: Path | None = None, log: Callable[[str], None] = print,
              progress: bool = True) -> list[dict]:
    """New data arrived: append its documents to the cache (`output.mode = "append"`: rows already cached are
    skipped, so a rerun is free), then every student of `student_config` continues from its last model
    (previous/<name>/model, default the config's output_dir) on the grown cache, into `out`."""
    from ..capture.run import run_capture
    from ..train.recipe import train_students

    if not data_files:
        raise DataError("redistill needs the new documents: --data FILES")
    previous = Path(previous or student_config.output_dir)
    if Path(out).resolve() == previous.resolve():
        raise ConfigError(f"--out {out} is where the students to continue are: write the new students elsewhere "
                          "(e.g. a dated folder), so the last good ones stay")
    missing = [s.name for s in student_config.students if not (previous / s.name / "model").is_dir()]
    if missing:
        raise StudentError(f"no trained model to continue for {missing} in {previous} (expected "
                           f"{previous}/<name>/model): train them once with distill student, or pass --from")
    grown = cache_config.output.dir
    if not any(t.cache.rstrip("/") == grown.rstrip("/") for t in student_config.source_list()):
        raise ConfigError(f"the cache the new documents go into ({grown}) is not one the students train on "
                          f"({', '.join(t.cache for t in student_config.source_list())})")
    cache_config = cache_config.model_copy(update={
        "data": cache_config.data.model_copy(update={"data_files": list(data_files)}),
        "output": cache_config.output.model_copy(update={"mode": "append", "overwrite": False})})
    run_capture(cache_config, log=log, progress=progress)
    students = []
    for s in student_config.students:
        d = s.model_dump(mode="json", exclude={"arch", "pretrained", "from_teacher"})
        students.append({**d, "pretrained": str(previous / s.name / "model")})
    scfg = StudentRunConfig.model_validate({**student_config.model_dump(mode="json"), "students": students,
                                            "output_dir": str(out)})
    if distributed.ranks().main:
        write_student_settings(Path(out), scfg, "this re-distillation")
    return train_students(scfg, log=log, progress=progress)
