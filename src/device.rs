//! `--device` and `--dtype`: the flags every model-loading command shares.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// Where tensors live: `cpu` or `cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// `cuda:N`, or plain `cuda` (None): GPU 0, or under mpirun/srun the rank's local rank, so that the usual
    /// one-process-per-GPU launch needs no per-rank flags.
    Cuda(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(Some(n))),
                _ => Err(format!("unknown device {s:?}: use cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(None) => write!(f, "cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device; CUDA needs a binary built with `--features cuda` (see tools/build-cuda.sh).
    pub fn open(self) -> candle_core::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n.unwrap_or_else(|| local_rank(&|v| std::env::var(v).ok()))),
        }
    }
}

/// This process's rank among the ranks on its machine, from the launcher's environment (Open MPI, MPICH/Hydra,
/// Slurm, PMIx); 0 when no launcher started it. `var` reads one environment variable.
pub fn local_rank(var: &dyn Fn(&str) -> Option<String>) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
        "PMIX_LOCAL_RANK",
    ]
    .into_iter()
    .find_map(|v| var(v)?.trim().parse().ok())
    .unwrap_or(0)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> candle_core::Result<Device> {
    Err(candle_core::Error::Msg(format!(
        "cannot open cuda:{n}: this rrhf binary was built without CUDA; build one with `bash tools/build-cuda.sh` \
         (or `cargo build --release --features cuda` where a CUDA toolkit is installed), or pass --device cpu"
    )))
}

/// Opens CUDA device `n`. The CUDA build loads libcuda, libcublas, libcurand and libnvrtc when the first device is
/// opened (cudarc's dynamic loading, so the binary starts on machines without them), and cudarc *panics* when one
/// cannot be loaded: the panic is caught here and turned into an error that says what is missing.
#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> candle_core::Result<Device> {
    let opened = crate::panic::catch_quietly(|| Device::new_cuda(n));
    let msg = match opened {
        Ok(Ok(device)) => return Ok(device),
        Ok(Err(e)) => {
            format!("no CUDA device cuda:{n} found ({e}); check `nvidia-smi`, or pass --device cpu")
        }
        Err(detail) => {
            if detail.contains("\"cuda\" shared library") {
                // (cudarc's message lists three dozen file names; the one that matters is libcuda.so.1.)
                "no CUDA device found: the NVIDIA driver library libcuda.so.1 cannot be loaded (no NVIDIA driver \
                 on this machine, or not on LD_LIBRARY_PATH); pass --device cpu"
                    .to_string()
            } else {
                format!(
                    "cannot open cuda:{n}: a CUDA library could not be loaded ({detail}); put CUDA 13 or 12 \
                     libcublas, libcublasLt, libcurand and libnvrtc on LD_LIBRARY_PATH (for example the \
                     nvidia/*/lib folders of a PyTorch installation)"
                )
            }
        }
    };
    Err(candle_core::Error::Msg(msg))
}

/// Floating-point type of the weights and activations: `f32`, `bf16` or `f16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    #[default]
    F32,
    Bf16,
    F16,
}

impl FromStr for DTypeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            _ => Err(format!("unknown dtype {s:?}: use f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl DTypeSpec {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_and_dtype_flags_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!(
            "cuda:1".parse::<DeviceSpec>(),
            Ok(DeviceSpec::Cuda(Some(1)))
        );
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(None)));
        assert_eq!(DeviceSpec::Cuda(None).to_string(), "cuda");
        assert_eq!(DeviceSpec::Cuda(Some(0)).to_string(), "cuda:0");
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("tpu"));
        assert_eq!("bf16".parse::<DTypeSpec>(), Ok(DTypeSpec::Bf16));
        assert!("f8".parse::<DTypeSpec>().is_err());
    }

    #[test]
    fn plain_cuda_follows_the_launchers_local_rank() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |v: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == v)
                    .map(|(_, x)| x.to_string())
            }
        };
        assert_eq!(local_rank(&env(&[])), 0);
        assert_eq!(local_rank(&env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])), 3);
        assert_eq!(local_rank(&env(&[("SLURM_LOCALID", "1")])), 1);
        // Open MPI's own variable wins over Slurm's when mpirun runs inside an allocation.
        assert_eq!(
            local_rank(&env(&[
                ("SLURM_LOCALID", "1"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "2")
            ])),
            2
        );
        assert_eq!(local_rank(&env(&[("MPI_LOCALRANKID", "x")])), 0);
    }
}
