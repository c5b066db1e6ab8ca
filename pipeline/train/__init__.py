"""Stage 2: students trained from finished caches, the teacher never loaded. In the order data flows:

    split_reader.py    a split's rows read from a row group and a few Zarr chunks (SplitReader)
    batch_order.py     the order of an epoch's batches, from one integer per shard (EpochPlan)
    dataset.py         one split as a dataset of batches: deterministic, resumable (CacheBatches)
    mixing.py          a run's sources mixed by weight into one stream, split over ranks (SourceMix)
    sources.py         a run's caches opened and checked against each other; what the run is built from (Inputs)
    signal.py          what the terms read: Masks, TeacherSignal, StudentOutput, Context
    losses.py          the pure functions; computations.py what each term computes; terms.py the registry (TERMS)
    fused.py           the logit terms a block of positions at a time, fused with the LM head (gradients in the forward)
    representation.py  layer maps and projections for hidden-state and attention terms
    head.py            the teacher's LM head from a final_hidden cache (exact full-vocabulary KD)
    crosstok.py        students with another tokenizer: positions aligned by text (Retokenizer)
    retokenized.py     a split re-tokenised once and kept; vocab_map.py the teacher's vocabulary in the student's
    student_init.py    a student's model: a shape, a checkpoint, the teacher's layers; tokenizer and task checks
    memory_plan.py     each rank's memory planned from the students' shapes on the meta device (--dry-run, "auto")
    students.py        StudentModule, wiring, optimiser, Student; build.py a student ready to train
    step.py            a student's forward pass and terms on a batch; the mutual term
    metrics.py         metrics against the cached teacher (and gold labels); heldout.py the held-out sets
    checkpoint.py      run state, identity, atomic saves, metrics truncation
    report.py          reports and curves; tracking.py TensorBoard and W&B
    recipe.py          the run: setup, train, finish, on one process or under DDP (train_students)
    hf.py              the same terms inside a transformers Trainer
"""
