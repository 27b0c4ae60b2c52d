"""The gpu pool's flow: fill the prototype bank for some cells (deployed as `synthesize-prototypes/gpu`).

The main flows send their missing cells here through `flows.fanout.fill_bank_routed` when
`CLIPFORGET_SYNTHESIS_DEPLOYMENT` names this flow's deployment. The flow itself can fan out further on Ray:
its task runner is `flows.runners.task_runner()`, read from this process's environment at import
(`CLIPFORGET_RAY_ADDRESS`, `CLIPFORGET_GPUS_PER_TASK`, `CLIPFORGET_CELLS_PER_TASK`). It reads the checkpoint
and the text embeddings at the paths it is given and writes the bank under `CLIPFORGET_CACHE`, a volume it
shares with the caller.
"""

from __future__ import annotations

from prefect import flow

from flows.fanout import fill_bank
from flows.runners import task_runner


@flow(name="synthesize-prototypes", task_runner=task_runner(), validate_parameters=True)
def synthesize_prototypes_flow(arch: str, checkpoint: str, sha256: str, text_file: str, cells: list[str],
                               synthesis: dict, with_images: bool = False, checkpoint_uri: str | None = None) -> dict:
    """Prototypes of `cells` into the bank (only those it lacks); returns {paths, reused, synthesized, seconds}.
    A Ray worker without `checkpoint` on its disk fetches `checkpoint_uri` (s3:// or file://) instead."""
    return fill_bank(arch, checkpoint, sha256, text_file, cells, synthesis, with_images=with_images,
                     checkpoint_uri=checkpoint_uri)
