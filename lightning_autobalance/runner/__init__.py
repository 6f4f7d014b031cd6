"""The experiment runner: the pipeline (search, export, retrain, baselines, results), the fingerprints that decide
whether a finished stage can be reused, the output folder's lock, and the ``lightning-autobalance`` CLI."""
