"""Orbax checkpoints of the training state: a killed run resumes from its last complete step.

Orbax writes each step into a temporary directory and renames it when complete, so a step
interrupted mid-save is never listed; ``restore_latest`` only sees finished steps.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def state_manager(directory: str, every: int, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(manager: ocp.CheckpointManager, template):
    """The latest complete checkpoint restored into ``template``'s structure, or ``template``."""
    step = manager.latest_step()
    if step is None:
        return template
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
