//! Device choice at run time: `auto` (the first CUDA GPU when one is usable, else the
//! CPU), `cpu`, `cuda` or `cuda:N`.

use std::{fmt, str::FromStr};

use tch::Device;

use crate::error::CoreError;

/// What the user asked for; [`DeviceChoice::resolve`] turns it into a `tch::Device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// The concrete device. `Cuda(n)` on a machine without that GPU is an error rather than
    /// a silent fall-back, so a deployment that expects a GPU notices.
    pub fn resolve(self) -> Result<Device, CoreError> {
        match self {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                let available = tch::Cuda::device_count();
                if (n as i64) < available {
                    Ok(Device::Cuda(n))
                } else {
                    Err(CoreError::config(
                        "device",
                        format!("cuda:{n} requested but {available} CUDA device(s) are visible"),
                    ))
                }
            }
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = CoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(CoreError::config(
                    "device",
                    format!("unknown device {s:?}: use auto, cpu, cuda or cuda:N"),
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Checks a device name as the command lines take it (the binaries' `--device`, a
/// `String` in the shared options) and returns it unchanged: a clap value parser, so a
/// bad name is refused when the command line is parsed.
pub fn device_arg(name: &str) -> Result<String, CoreError> {
    name.parse::<DeviceChoice>().map(|_| name.to_owned())
}

/// Sets libtorch's CPU threads for this process; 0 leaves libtorch's default (one per
/// core).
pub fn set_cpu_threads(threads: i32) {
    if threads > 0 {
        tch::set_num_threads(threads);
    }
}

/// A short human name for a resolved device (`cpu`, `cuda:0`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        let err = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(err.contains("device"), "{err}");
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        assert_eq!(device_arg("cuda:1").unwrap(), "cuda:1");
        assert!(device_arg("tpu").is_err());
    }

    #[test]
    fn cpu_always_resolves() {
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap(), Device::Cpu);
        // A GPU index far beyond any machine is refused, not silently replaced.
        assert!(DeviceChoice::Cuda(1000).resolve().is_err());
    }
}
