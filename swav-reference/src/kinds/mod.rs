//! One runner per case kind: each reads a case (or its perturbed copy) and returns every tensor our
//! implementation produced for it, named after the case's tensor it is compared with.

pub(crate) mod loss;
pub(crate) mod model;
pub(crate) mod sinkhorn;
pub(crate) mod train;
