//! Optimizer-state sharding (ZeRO stage 1): each rank keeps AdamW's moments for one contiguous share of the
//! parameters and updates only those; the updated values then travel from each owner to every rank.
//!
//! The gradients are still all-reduced whole (every rank needs them all for the global norm and clipping), so a
//! step moves the all-reduce plus one broadcast of the weights; what it saves is 8 bytes per parameter of AdamW
//! state on all but 1/N of the parameters — the part of a replicated rank's memory that grows fastest.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Result, Tensor, Var};

use super::Comm;

/// Contiguous shares of parameters with element counts `sizes`, one per rank, each about 1/`n` of the elements
/// (within one parameter's size). Some shares may be
/// empty when there are fewer large parameters than ranks.
pub fn shard_ranges(sizes: &[usize], n: usize) -> Vec<Range<usize>> {
    let total: usize = sizes.iter().sum();
    let n = n.max(1);
    let mut owner_end = vec![0usize; n];
    let mut at = 0usize;
    for (i, &k) in sizes.iter().enumerate() {
        // Rank r owns the parameters whose middle element falls in [r·total/n, (r+1)·total/n); u128 keeps the
        // products exact.
        let mid2 = 2 * at as u128 + k as u128;
        let r = ((mid2 * n as u128) / (2 * total.max(1) as u128)) as usize;
        owner_end[r.min(n - 1)] = i + 1;
        at += k;
    }
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for &end in &owner_end {
        let end = end.max(start);
        out.push(start..end);
        start = end;
    }
    out
}

/// Elements per broadcast: a share travels in pieces of about this size (64 MiB of f32), so that no rank holds
/// more than one piece of another's share at a time.
const PIECE: usize = 16 << 20;

/// Consecutive runs of `range` whose parameters hold about [`PIECE`] elements together (a larger one goes alone).
fn pieces(vars: &[(String, Var)], range: Range<usize>) -> Vec<Range<usize>> {
    let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
    super::grads::runs(&sizes, range, PIECE)
}

/// After every rank updated its share of `vars` (`ranges[r]` for rank r), sends each share from its owner to all
/// ranks, so that every rank holds the same updated weights. Values travel as their bytes: bit-exact.
pub fn broadcast_shards(
    comm: &Comm,
    vars: &[(String, Var)],
    ranges: &[Range<usize>],
) -> Result<()> {
    for (r, range) in ranges.iter().enumerate() {
        for piece in pieces(vars, range.clone()) {
            let share = &vars[piece];
            let mut bytes = Vec::new();
            if r == comm.rank() {
                for (_, v) in share {
                    bytes.extend(tensor_bytes(v.as_tensor())?);
                }
            }
            comm.broadcast_bytes("the broadcast of updated weights (ZeRO-1)", r, &mut bytes);
            if r == comm.rank() {
                continue;
            }
            let mut at = 0;
            for (name, v) in share {
                let k = v.elem_count() * v.dtype().size_in_bytes();
                let part = bytes.get(at..at + k).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "ZeRO-1: rank {r} sent {} bytes for its parameters, short at `{name}`",
                        bytes.len()
                    ))
                })?;
                let t = Tensor::from_raw_buffer(part, v.dtype(), v.dims(), &Device::Cpu)?;
                v.set(&t.to_device(v.device())?)?;
                at += k;
            }
        }
    }
    Ok(())
}

/// Every rank's share of the optimizer state, merged on rank 0 (other ranks get an empty map). `state_of(i)` is
/// this rank's named state tensors of parameter `i` (empty where another rank owns it). The state travels a
/// piece at a time, so that no rank holds more than its own share and one piece of another's.
pub fn gather_state(
    comm: &Comm,
    vars: &[(String, Var)],
    ranges: &[Range<usize>],
    state_of: impl Fn(usize) -> Result<Vec<(String, Tensor)>>,
) -> Result<HashMap<String, Tensor>> {
    let mut merged = HashMap::new();
    for (r, range) in ranges.iter().enumerate() {
        for piece in pieces(vars, range.clone()) {
            let mine = if r == comm.rank() {
                piece
                    .map(&state_of)
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect()
            } else {
                Vec::new()
            };
            if r == 0 {
                // Rank 0's own share needs no message.
                if comm.is_root() {
                    merged.extend(mine);
                }
                continue;
            }
            let mut bytes = if r == comm.rank() {
                safetensors::serialize(mine, None).map_err(|e| {
                    candle_core::Error::Msg(format!("ZeRO-1: packing optimizer state: {e}"))
                })?
            } else {
                Vec::new()
            };
            comm.broadcast_bytes("the gather of optimizer state (ZeRO-1)", r, &mut bytes);
            if comm.is_root() {
                merged.extend(candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?);
            }
        }
    }
    Ok(merged)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => candle_core::bail!("ZeRO-1: parameters of dtype {other:?} are not supported"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_contiguous_cover_everything_and_balance_elements() {
        let sizes = [10, 10, 10, 10, 40, 10, 10];
        let r = shard_ranges(&sizes, 2);
        assert_eq!(r, vec![0..4, 4..7]);
        // One rank: everything.
        assert_eq!(shard_ranges(&sizes, 1), vec![0..7]);
        // More ranks than parameters: empty shares, still covering all, in order.
        let r = shard_ranges(&[5, 5], 4);
        assert_eq!(r.iter().map(|x| x.len()).sum::<usize>(), 2);
        assert!(r.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!((r[0].start, r[3].end), (0, 2));
        // Balanced: no share holds more than its 1/n plus one parameter.
        let sizes: Vec<usize> = (0..100).map(|i| 1 + (i * 37) % 50).collect();
        let total: usize = sizes.iter().sum();
        for n in [2, 3, 8] {
            let r = shard_ranges(&sizes, n);
            assert_eq!((r[0].start, r[n - 1].end), (0, 100));
            for share in &r {
                let elems: usize = sizes[share.clone()].iter().sum();
                assert!(
                    elems <= total / n + 50,
                    "{n} ranks: share {share:?} has {elems} of {total}"
                );
            }
        }
    }
}
