"""Adapters to the outside: atomic files, S3 and the local cache, checkpoints, the prototype bank, the MLflow
registry and its pyfunc model, exports and pictures."""
