//! The swav-rs compute engine: devices, tensors and neural-network ops with forward and backward.
