//! Primitive tensor ops below both the layers and the fused CPU kernels: the switch between fused and composed
//! paths, the f32 upcast of half types, and the composed (differentiable) softmax and log-softmax.

use candle_core::{DType, Tensor, D};

use super::error::Result;

thread_local! {
    /// Set by [`with_composed_ops`]: the fused CPU ops are bypassed on this thread.
    static COMPOSED_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every fused CPU op replaced by its composed path — the one CUDA and half-precision inputs take —
/// on this thread, so tests can check on the CPU that the two paths agree (values and gradients). Only the forward
/// needs to run inside: each op's backward is fixed when the forward records it.
pub fn with_composed_ops<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSED_ONLY.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPOSED_ONLY.with(|c| c.replace(true)));
    f()
}

/// Whether the fused CPU kernels (f32, host memory, with their own backward) may run on these tensors: elsewhere
/// (CUDA, bf16/f16, f64) the composed candle ops are used, which have a backward on every device.
pub(crate) fn fused_ok(xs: &[&Tensor]) -> bool {
    !COMPOSED_ONLY.with(|c| c.get())
        && xs
            .iter()
            .all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// The dtype that norms, softmax and scores are computed in: f32 for half types, else the input's own.
pub(crate) fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    })
}

/// Large finite negative added to masked attention scores: −inf would turn a fully masked row into NaN.
pub const MASK_NEG: f32 = -1.0e9;

/// `log_softmax` over the last dimension (in f32 for half types). The max shift is detached: it cancels in the result and its
/// backward would only cost time.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let x = upcast(x)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Softmax over the last dimension, differentiable.
pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}
