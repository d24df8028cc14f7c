"""Training: pure functions (init_state, train_step, eval_step), the loop and its launcher."""

from train.trainer import TrainConfig, TrainState, eval_step, init_state, train, train_step

__all__ = ["TrainConfig", "TrainState", "eval_step", "init_state", "train", "train_step"]
