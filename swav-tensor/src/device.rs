//! Where tensors live and ops run: the CPU, or a CUDA device by ordinal. Every op dispatches on the
//! device of its inputs, so a model is one code path for both.

use std::fmt;

/// A device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, the CPU engine.
    #[default]
    Cpu,
    /// CUDA device `n` (see `cuda::runtime`: opened on first use).
    Cuda(usize),
}

impl Device {
    /// Parses a device name as given on the command line (`cpu`, `cuda`, `cuda:1`). Whether the device
    /// exists is checked when it is opened.
    pub fn parse(name: &str) -> crate::Result<Device> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Device::Cuda(i)),
                _ => Err(crate::TensorError::Device(format!("unknown device `{n}` (expected cpu, cuda or cuda:N)"))),
            },
        }
    }

    /// Number of worker threads the CPU backend uses.
    pub fn threads(&self) -> usize {
        rayon::current_num_threads()
    }

    /// Whether this is a CUDA device.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for name in ["cpu", "cuda:0", "cuda:3"] {
            assert_eq!(Device::parse(name).unwrap().to_string(), name);
        }
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert!(Device::parse("gpu").is_err() && Device::parse("cuda:x").is_err());
    }
}
