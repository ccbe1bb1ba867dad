//! Sharded, memory-mapped image datasets and the SwAV multi-crop loader.
