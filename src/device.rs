use tch::{Device, Kind};

use crate::error::{Error, Result};

/// `cpu`, `cuda` (device 0) or `cuda:N`. CUDA where none exists is an error,
/// never a silent CPU run.
pub fn parse_device(s: &str) -> Result<Device> {
    let device = match s.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => {
                return Err(Error::Device(format!(
                    "unknown device `{s}` (expected cpu, cuda or cuda:N)"
                )))
            }
        },
    };
    check_available(device)?;
    Ok(device)
}

pub fn check_available(device: Device) -> Result<()> {
    if let Device::Cuda(i) = device {
        let count = if tch::Cuda::is_available() {
            tch::Cuda::device_count() as usize
        } else {
            0
        };
        if i >= count {
            return Err(Error::Device(format!(
                "cuda:{i} was asked for, but this machine has {count} CUDA device(s)"
            )));
        }
    }
    Ok(())
}

pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// `f32`, `f16`, `bf16` → the tensor kind.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" => Ok(Kind::Float),
        "f16" | "float16" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        other => Err(Error::input(
            "dtype",
            format!("unknown dtype `{other}` (expected f32, f16 or bf16)"),
        )),
    }
}
