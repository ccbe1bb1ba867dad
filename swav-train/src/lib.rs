//! SwAV training loop, loss, queue, LARS, checkpoints and evaluation.
