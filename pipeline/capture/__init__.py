"""Stage 1: the teacher run once over a dataset, its targets written into a cache.

    documents.py  datasets, chat templates, what the teacher expects of its rows
    rows.py       documents -> fixed-length token rows with keys and splits (`prepare`)
    labels.py     a classifier's rows: one labelled example each
    checks.py     settings against the teacher, the output location, the disk; first-rows check
    plan.py       everything that determines the cache's bytes; comparing and growing plans
    output.py     the output location: resume, refuse, overwrite; the files written before shards
    targets.py    one teacher forward pass -> top-K, logsumexp, samples, hidden states, attention maps
    run.py        the capture on one or many ranks (`run_capture`)
"""
