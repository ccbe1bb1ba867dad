//! ONNX export of SwAV backbones.
