"""Stage 1: the teacher run once over a dataset, its targets written into a cache.

    run.py        the capture on one or many ranks (`run_capture`): calls the modules below, top to bottom
    teacher.py    what is known of the teacher before its weights load, its settings checked (`describe_teacher`)
    checks.py     settings against the teacher, the output location, the disk; first-rows check
    memory.py     the device memory the capture will take, checked
    tensor_parallel.py  a teacher split over a group of ranks (teacher.tp_size): the mesh, its checks
    documents.py  datasets, what the teacher expects of its rows, documents -> token lists
    chat.py       chat templates: rendering conversations, the assistant's tokens
    lineage.py    rows given as token ids: the `distill generate` run that sampled them
    packing.py    token lists -> fixed-length rows
    labels.py     a classifier (`Classifier`) and its rows: one labelled example each
    rows.py       rows keyed, deduplicated and split into scratch files (`prepare`)
    plan.py       everything that determines the cache's bytes; comparing and growing plans
    output.py     the output location: resume, refuse, overwrite; the files written before shards
    targets.py    one teacher forward pass -> top-K, logsumexp, samples; on its way to the host (HostBatch)
    representations.py  hidden states (recorded by hooks) and attention maps, in their storage dtypes
    shards.py     the shard loop: targets computed, written by writer threads, committed; progress
    arrival.py    rows that arrive in long runs of one label or source file: a warning, a dry run's figure
    dryrun.py     `--dry-run`: what a capture would do, before any weight is loaded

`distill import` (another tool's top-K log-probs as a cache): importer.py, with survey.py (pass 1),
imported.py and layouts.py (reading the sources), rowfiles.py (scratch row files, shared with `prepare`).
"""
