//! The one error type of the core crate, and what a libtorch failure says about its device
//! ([`DeviceFault`]), decided once, where a `tch` error becomes a [`CoreError`].

use std::{any::Any, path::PathBuf};

/// Everything the core can fail at. Shapes and files come from outside (requests,
/// checkpoints, configs), so these are returned, never panicked on.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A model, schedule or sampler configuration that cannot work, with the field named.
    #[error("invalid config: {field}: {message}")]
    Config { field: String, message: String },
    /// A sampling or training input outside what the model accepts.
    #[error("invalid input: {0}")]
    Input(String),
    /// A libtorch operation failed (bad shape, device, out of memory, …).
    #[error("libtorch: {source}")]
    Torch {
        #[source]
        source: tch::TchError,
        /// Classified from the message once, here: libtorch reports CUDA errors as text.
        fault: DeviceFault,
    },
    /// A panicking tensor operation (tch's non-`f_` operators, the network's forward pass)
    /// caught by a caller's last guard; `message` is the panic's.
    #[error("a tensor operation panicked: {message}")]
    Panic { message: String, fault: DeviceFault },
    /// A checkpoint or training-state file that is unreadable, truncated, corrupt or does
    /// not match the model it is loaded into.
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
}

/// What a failure says about the device it happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceFault {
    /// The device context is unusable until the process restarts: after a CUDA error such
    /// as an illegal memory access or a device-side assert, every later call fails too.
    Sticky,
    /// The device is fine (or was not involved): out of memory, a bad shape, a bad input.
    /// Out-of-memory is not sticky: a smaller pass may succeed.
    Recoverable,
}

impl DeviceFault {
    /// Classifies a libtorch error message (CUDA errors reach Rust as text only).
    pub fn of_message(message: &str) -> DeviceFault {
        const STICKY: [&str; 8] = [
            "illegal memory access",
            "device-side assert",
            "unspecified launch failure",
            "an illegal instruction",
            "misaligned address",
            "cuda error: launch failure",
            "uncorrectable ecc error",
            "cudaerrorlaunchfailure",
        ];
        let m = message.to_ascii_lowercase();
        if STICKY.iter().any(|s| m.contains(s)) {
            DeviceFault::Sticky
        } else {
            DeviceFault::Recoverable
        }
    }
}

impl From<tch::TchError> for CoreError {
    fn from(source: tch::TchError) -> Self {
        let fault = DeviceFault::of_message(&source.to_string());
        CoreError::Torch { source, fault }
    }
}

impl CoreError {
    /// A panic's payload (from `std::panic::catch_unwind`) as an error, its device fault
    /// classified like a returned libtorch error's.
    pub fn from_panic(payload: &(dyn Any + Send)) -> CoreError {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into());
        let fault = DeviceFault::of_message(&message);
        CoreError::Panic { message, fault }
    }

    /// What this error says about the device: [`DeviceFault::Sticky`] only for a libtorch
    /// failure that leaves the device unusable.
    pub fn device_fault(&self) -> DeviceFault {
        match self {
            CoreError::Torch { fault, .. } | CoreError::Panic { fault, .. } => *fault,
            _ => DeviceFault::Recoverable,
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        CoreError::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        CoreError::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_device_errors_are_told_from_recoverable_ones() {
        let torch = |m: &str| CoreError::from(tch::TchError::Torch(m.into())).device_fault();
        assert_eq!(
            torch("CUDA error: an illegal memory access was encountered"),
            DeviceFault::Sticky
        );
        assert_eq!(
            torch("CUDA out of memory. Tried to allocate 2.00 GiB"),
            DeviceFault::Recoverable
        );
        let panic = |p: Box<dyn Any + Send>| CoreError::from_panic(p.as_ref()).device_fault();
        assert_eq!(
            panic(Box::new(String::from(
                "Torch(\"CUDA error: device-side assert triggered\")"
            ))),
            DeviceFault::Sticky
        );
        assert_eq!(
            panic(Box::new("index out of bounds")),
            DeviceFault::Recoverable
        );
        assert_eq!(
            CoreError::Input("label 12 is outside 0..=10".into()).device_fault(),
            DeviceFault::Recoverable
        );
    }
}
