//! Gradient all-reduce on the GPUs with NCCL (feature `nccl`): one communicator per process over its CUDA device,
//! its unique id sent from rank 0 over MPI — the usual pattern of GPU data parallelism.
//!
//! The all-reduce is a candle custom op on the tensor's own CUDA stream, so it is ordered after the backward
//! kernels that produced the gradients and before the optimizer's, with no host copy. NCCL is loaded at run time
//! like the other CUDA libraries (libnccl.so.2, e.g. from PyTorch's `nvidia/nccl/lib`).

use std::cell::RefCell;
use std::ffi::c_char;
use std::rc::Rc;

use candle_core::cuda_backend::cudarc::nccl::{Comm as NcclComm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{CudaStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::Comm;

thread_local! {
    // NCCL communicators hold raw handles (neither Send nor Sync); training runs on one thread.
    static NCCL: RefCell<Option<(DeviceId, Rc<NcclComm>)>> = const { RefCell::new(None) };
}

fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {what} failed: {e:?}"))
}

/// This process's NCCL communicator over `dev`, created on first use — a collective: every rank gets here at the
/// same point of the same step.
fn communicator(comm: &Comm, dev: &CudaDevice) -> Result<Rc<NcclComm>> {
    if let Some(c) = NCCL.with(|n| {
        n.borrow()
            .as_ref()
            .filter(|(id, _)| *id == dev.id())
            .map(|(_, c)| c.clone())
    }) {
        return Ok(c);
    }
    let missing = |detail: String| {
        candle_core::Error::Msg(format!(
            "NCCL could not be loaded ({detail}); put libnccl.so.2 on LD_LIBRARY_PATH (for example the \
             nvidia/nccl/lib folder of a PyTorch installation), or build without the `nccl` feature to all-reduce \
             through host memory over MPI"
        ))
    };
    let mut bytes: Vec<u8> = if comm.is_root() {
        let id = crate::panic::catch_quietly(Id::new)
            .map_err(missing)?
            .map_err(|e| err("ncclGetUniqueId", e))?;
        id.internal().iter().map(|&c| c as u8).collect()
    } else {
        Vec::new()
    };
    comm.broadcast_bytes("the NCCL unique id", 0, &mut bytes);
    let mut internal = [0 as c_char; 128];
    if bytes.len() != internal.len() {
        return Err(err("receiving the unique id", bytes.len()));
    }
    for (c, b) in internal.iter_mut().zip(&bytes) {
        *c = *b as c_char;
    }
    let (rank, size) = (comm.rank(), comm.size());
    let made = crate::panic::catch_quietly(|| {
        NcclComm::from_rank(dev.cuda_stream(), rank, size, Id::uninit(internal))
    })
    .map_err(missing)?
    .map_err(|e| {
        candle_core::Error::Msg(format!(
            "NCCL: rank {rank} of {size} could not join the communicator ({e:?}); two ranks on one GPU are refused \
             by NCCL — start one rank per GPU (plain `--device cuda` takes the launcher's local rank)"
        ))
    })?;
    let made = Rc::new(made);
    NCCL.with(|n| *n.borrow_mut() = Some((dev.id(), made.clone())));
    Ok(made)
}

/// Sum over all ranks of a contiguous f32 CUDA tensor.
struct AllReduce<'a>(&'a NcclComm);

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor")
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = s.device.alloc_zeros::<f32>(end - start)?;
        self.0
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| err("ncclAllReduce", e))?;
        Ok((
            CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

/// The sum over all ranks of a flat f32 tensor on `device` (a CUDA device), by NCCL, timed and watched as a
/// collective; the communicator is joined on first use.
pub(super) fn summer<'a>(
    comm: &'a Comm,
    device: &'a candle_core::Device,
) -> Result<impl FnMut(&Tensor) -> Result<Tensor> + 'a> {
    let nccl = communicator(comm, device.as_cuda_device()?)?;
    Ok(move |flat: &Tensor| {
        // Backward's kernels finish first, so the collective's time is communication, not compute.
        device.synchronize()?;
        comm.collective(
            "the gradient all-reduce (NCCL)",
            flat.elem_count() * 4,
            || {
                let out = flat.apply_op1_no_bwd(&AllReduce(&nccl))?;
                device.synchronize()?;
                Ok::<_, candle_core::Error>(out)
            },
        )
    })
}
