//! The ImageNet normalisation of the official SwAV code (`main_swav.py`, `eval_linear.py`): the channel
//! means of torchvision and standard deviations 0.228, 0.224, 0.225 (torchvision's first value is
//! 0.229; the official code has 0.228, and swav-rs follows it).

/// Channel means (R, G, B) of pixels scaled to [0, 1].
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// Channel standard deviations (R, G, B) of pixels scaled to [0, 1].
pub const STD: [f32; 3] = [0.228, 0.224, 0.225];
