"""The method, pure torch: the concept grid, prompts, prototype synthesis, the projection, the fold, zero-shot
evaluation. Nothing here reads S3, MLflow or Prefect; a GPU worker needs only this package (and
`clipforget.io.checkpoints` to load a model). docs/DESIGN.md walks through it step by step."""
