//! Gradient all-reduce over tensors, in buckets, and a digest that shows every rank holds the same gradients.

use candle_core::{DType, Result, Tensor};

use super::Comm;

/// Elements per all-reduce call (64 MiB of f32): few calls for small models, a bounded host copy for large ones.
const BUCKET: usize = 16 << 20;

/// Replaces every gradient by its sum over all ranks, packing consecutive tensors into buckets of about
/// [`BUCKET`] elements (one collective each); a tensor larger than a bucket goes alone. Gradients are summed, not
/// averaged: each rank's gradients are already weighted by its micro-batches' share of the whole step's queries.
/// Non-f32 gradients are reduced in f32 and cast back.
pub fn all_reduce_sum_tensors(comm: &Comm, grads: &mut [Tensor]) -> Result<()> {
    if !comm.is_parallel() || grads.is_empty() {
        return Ok(());
    }
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut n = 0;
        while end < grads.len() && (end == start || n + grads[end].elem_count() <= BUCKET) {
            n += grads[end].elem_count();
            end += 1;
        }
        let mut flat = Vec::with_capacity(n);
        for g in &grads[start..end] {
            flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        comm.all_reduce_sum_f32("the gradient all-reduce", &mut flat);
        let mut at = 0;
        for g in &mut grads[start..end] {
            let k = g.elem_count();
            let t = Tensor::from_slice(&flat[at..at + k], g.shape(), g.device())?;
            *g = t.to_dtype(g.dtype())?;
            at += k;
        }
        start = end;
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
}
