"""Stage 2: students trained from finished caches, the teacher never loaded.

    reader.py          batches from the cache: deterministic, resumable, split over ranks (CacheBatches, TaskStream)
    signal.py          what the terms read: Masks, TeacherSignal, StudentOutput
    terms.py           the registry of loss terms (TERMS); losses.py the pure functions behind them
    representation.py  layer maps and projections for hidden-state and attention terms
    students.py        building students (arch, pretrained, from_teacher), tokenizer and task checks
    crosstok.py        students with another tokenizer: re-tokenised rows, alignment, the vocabulary map
    head.py            the teacher's LM head from a final_hidden cache (exact full-vocabulary KD)
    caches.py          a run's caches opened and checked against each other
    build.py           a student ready to train: model, checks, wiring, optimiser, output folder
    step.py            one student's module, forward pass, optimiser; the mutual term
    checkpoint.py      identity, state, atomic saves, metrics truncation
    evaluate.py        metrics against the cached teacher (and gold labels); validation.py the held-out sets
    report.py          reports and curves
    recipe.py          the run: setup, train, finish, on one process or under DDP (train_students)
"""
