"""Stage 2: students trained from a finished cache, the teacher never loaded.

reader (batches from the cache), terms (the registry of loss terms and the typed student output
and teacher signal they read), losses (the pure functions behind them), representation (layer
maps and projections), students (building students), recipe (the training run, on one process
or under DDP), evaluate (metrics against the cached teacher).
"""
