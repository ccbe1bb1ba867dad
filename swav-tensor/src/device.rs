//! Where tensors live and ops run. The CPU backend is complete; the CUDA backend slots in here as a
//! second variant, and every op dispatches on the device of its inputs.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
}

impl Device {
    /// Parses a device name as given on the command line (`cpu`, `cuda`, `cuda:1`).
    pub fn parse(name: &str) -> crate::Result<Device> {
        match name {
            "cpu" => Ok(Device::Cpu),
            n if n == "cuda" || n.starts_with("cuda:") => Err(crate::TensorError::Device(
                "the CUDA training backend is not available in this build of the engine yet; \
                 use --device cpu (Sinkhorn has its own CUDA path in swav-sinkhorn)"
                    .into(),
            )),
            other => Err(crate::TensorError::Device(format!("unknown device `{other}` (expected cpu or cuda[:N])"))),
        }
    }

    /// Number of worker threads the CPU backend uses.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
        }
    }
}
