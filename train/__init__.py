"""Training: pure functions (init_state, train_step, eval) and their launcher."""
