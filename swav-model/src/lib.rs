//! ResNet family, SwAV projection head and prototypes, safetensors checkpoints with torchvision names.
