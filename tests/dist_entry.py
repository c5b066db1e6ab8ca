"""The `distill` command for the torchrun tests, with faults injected into one rank on request.

    DISTILL_TEST_KILL_RANK=1 DISTILL_TEST_KILL_AFTER_SHARDS=1: that rank dies (os._exit) right after
        committing its first shard, as a killed node would.
    DISTILL_TEST_KILL_RANK=0 DISTILL_TEST_KILL_AFTER_STEP=5: that rank dies after optimiser step 5.
    DISTILL_TEST_COUNT_DOCS=DIR (DISTILL_TEST_DOC_BATCH=N): each rank writes DIR/rank-R.json with the number of
        documents it tokenised itself (in blocks of N documents).
The rest is the real command line: `python tests/dist_entry.py teacher-cache -c ...`.
"""

import os

if os.environ.get("DISTILL_TEST_KILL_RANK") == os.environ.get("RANK"):
    if "DISTILL_TEST_KILL_AFTER_SHARDS" in os.environ:
        from pipeline.format import CacheWriter

        after, done, real = int(os.environ["DISTILL_TEST_KILL_AFTER_SHARDS"]), [0], CacheWriter.write_shard

        def write_then_die(self, *a, **k):
            rec = real(self, *a, **k)
            done[0] += 1
            if done[0] >= after:
                os._exit(9)
            return rec

        CacheWriter.write_shard = write_then_die
    if "DISTILL_TEST_KILL_AFTER_STEP" in os.environ:
        from pipeline.train import recipe

        at, real_init = int(os.environ["DISTILL_TEST_KILL_AFTER_STEP"]), recipe.Recipe.__init__

        def init(self, *a, **k):
            real_init(self, *a, **k)
            self.after_step = lambda step: os._exit(9) if step == at else None

        recipe.Recipe.__init__ = init

if "DISTILL_TEST_COUNT_DOCS" in os.environ:
    import atexit
    import json
    from pathlib import Path

    from pipeline import distributed
    from pipeline.capture import documents

    documents.DOC_BATCH = int(os.environ.get("DISTILL_TEST_DOC_BATCH", documents.DOC_BATCH))
    counted, real_split = [0], distributed.split_work

    def counting(items, work):
        def counted_work(item):
            counted[0] += len(next(iter(item[1].values())))  # (first document, {column: values})
            return work(item)
        return real_split(items, counted_work)

    distributed.split_work = counting
    out = Path(os.environ["DISTILL_TEST_COUNT_DOCS"])
    atexit.register(lambda: (out.mkdir(parents=True, exist_ok=True),
                             (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counted[0]))))

from stages.cli import main  # noqa: E402

main()
