//! Gradient all-reduce over tensors, in buckets, and a digest that shows every rank holds the same gradients.

use std::ops::Range;

use candle_core::{DType, Result, Tensor};

use super::Comm;

/// Elements per all-reduce call (64 MiB of f32): few calls for small models, a bounded host copy for large ones.
const BUCKET: usize = 16 << 20;

/// Consecutive index ranges of `grads` of about [`BUCKET`] elements each; a tensor larger than a bucket goes alone.
fn buckets(grads: &[Tensor]) -> Vec<Range<usize>> {
    let sizes: Vec<usize> = grads.iter().map(Tensor::elem_count).collect();
    runs(&sizes, 0..sizes.len(), BUCKET)
}

/// Cuts `range` into consecutive runs whose `sizes` add up to at most `limit` (an item larger than that alone).
pub(super) fn runs(sizes: &[usize], range: Range<usize>, limit: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let (mut end, mut n) = (start, 0);
        while end < range.end && (end == start || n + sizes[end] <= limit) {
            n += sizes[end];
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// Test hook for a one-GPU machine: with this variable set to 1, a world of one still all-reduces CUDA gradients
/// through a one-rank NCCL communicator (the sum is the identity, so the step must equal the plain one).
pub const NCCL_WORLD_OF_ONE: &str = "RRHF_NCCL_WORLD_OF_ONE";

/// Replaces every gradient by its sum over all ranks, packing consecutive tensors into buckets of about
/// [`BUCKET`] elements (one collective each). Gradients are summed, not averaged: each rank's gradients are
/// already weighted by its micro-batches' share of the whole step's queries. Sums are taken in f32 (non-f32
/// gradients are cast back). CUDA gradients go through NCCL on the GPU in a `nccl` build, else through host
/// memory over MPI.
pub fn all_reduce_sum_tensors(comm: &Comm, grads: &mut [Tensor]) -> Result<()> {
    if grads.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "nccl")]
    if grads[0].device().is_cuda()
        && (comm.is_parallel() || std::env::var(NCCL_WORLD_OF_ONE).is_ok_and(|v| v == "1"))
    {
        let device = grads[0].device().clone();
        let sum = super::nccl::summer(comm, &device)?;
        return reduce_packed(grads, &buckets(grads), sum);
    }
    if !comm.is_parallel() {
        return Ok(());
    }
    for range in buckets(grads) {
        let n: usize = grads[range.clone()].iter().map(Tensor::elem_count).sum();
        let mut flat = Vec::with_capacity(n);
        for g in &grads[range.clone()] {
            flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        comm.all_reduce_sum_f32("the gradient all-reduce", &mut flat);
        let mut at = 0;
        for g in &mut grads[range] {
            let k = g.elem_count();
            let t = Tensor::from_slice(&flat[at..at + k], g.shape(), g.device())?;
            *g = t.to_dtype(g.dtype())?;
            at += k;
        }
    }
    Ok(())
}

/// Packs each bucket of `grads` into one flat f32 tensor on their device, replaces it by `reduce(flat)` (same
/// length) and unpacks the result into the gradients' shapes and dtypes: the device-side half of an all-reduce,
/// with the collective itself in `reduce`.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(super) fn reduce_packed(
    grads: &mut [Tensor],
    buckets: &[Range<usize>],
    mut reduce: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<()> {
    for range in buckets {
        let parts = grads[range.clone()]
            .iter()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        let flat = Tensor::cat(&parts, 0)?;
        let summed = reduce(&flat)?;
        let mut at = 0;
        for g in &mut grads[range.clone()] {
            let k = g.elem_count();
            *g = summed
                .narrow(0, at, k)?
                .reshape(g.shape())?
                .to_dtype(g.dtype())?;
            at += k;
        }
    }
    Ok(())
}

/// The L2 norm of all gradients and a CRC-32 of their bits (in order): equal digests on two ranks mean equal
/// gradients, bit for bit.
pub fn grad_digest(grads: &[Tensor]) -> Result<(f64, String)> {
    let mut crc = flate2::Crc::new();
    let mut sq = 0f64;
    for g in grads {
        let v = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in &v {
            sq += f64::from(*x) * f64::from(*x);
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        crc.update(&bytes);
    }
    Ok((sq.sqrt(), format!("{:08x}", crc.sum())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn digest_sees_a_one_bit_change() {
        let a = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(
            &[1.0f32, 2.0, f32::from_bits(3.0f32.to_bits() + 1)],
            &Device::Cpu,
        )
        .unwrap();
        let (na, ha) = grad_digest(std::slice::from_ref(&a)).unwrap();
        let (_, hb) = grad_digest(&[b]).unwrap();
        assert!((na - 14f64.sqrt()).abs() < 1e-12);
        assert_ne!(ha, hb);
    }

    #[test]
    fn packed_reduce_returns_each_gradient_in_its_shape_and_dtype() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let b = Tensor::new(&[5.0f32, -6.0, 7.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let c = Tensor::new(&[[[8.0f32]]], &dev).unwrap();
        let mut grads = vec![a, b, c];
        let mut seen = Vec::new();
        // Two ranks holding the same gradients: the sum doubles every element.
        reduce_packed(&mut grads, &[0..2, 2..3], |flat| {
            seen.push(flat.to_vec1::<f32>()?);
            flat * 2.0
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.0, 7.0], vec![8.0]]
        );
        assert_eq!(grads[0].to_vec2::<f32>().unwrap(), [[2.0, 4.0], [6.0, 8.0]]);
        assert_eq!(grads[1].dtype(), DType::BF16);
        assert_eq!(
            grads[1]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [10.0, -12.0, 14.0]
        );
        assert_eq!(grads[2].dims(), [1, 1, 1]);
        assert_eq!(
            grads[2].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [16.0]
        );
    }

    #[test]
    fn buckets_cover_every_tensor_once_in_order() {
        let t = |n: usize| Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
        let grads = [t(3), t(BUCKET - 3), t(1), t(BUCKET + 5), t(2)];
        // A full bucket, then one that closes when the next tensor would overflow it, the oversized one alone.
        assert_eq!(buckets(&grads), vec![0..2, 2..3, 3..4, 4..5]);
        assert!(buckets(&[]).is_empty());
    }
}
