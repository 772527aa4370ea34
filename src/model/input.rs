//! The model input: token ids with explicit position ids and an explicit attention mask.
//!
//! Padded batches and prefix-shared packed rows (one query followed by k responses, each response restarting its
//! positions after the query and seeing only the query and itself) are both just an `Input`.

use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};

/// Token ids `[B, T]` (u32), position ids `[B, T]` (u32) and mask `[B, T, T]` (u8, `mask[b, q, k] = 1` when
/// position q may attend position k).
#[derive(Debug, Clone)]
pub struct Input {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: Tensor,
}

impl Input {
    /// Checks shapes and dtypes of the three parts.
    pub fn new(ids: Tensor, positions: Tensor, mask: Tensor) -> Result<Self> {
        let (b, t) = ids
            .dims2()
            .map_err(|_| ModelError::Input(format!("ids must be [B, T], got {:?}", ids.dims())))?;
        if positions.dims() != [b, t] {
            return Err(ModelError::Input(format!(
                "positions must be [{b}, {t}] like the ids, got {:?}",
                positions.dims()
            )));
        }
        if mask.dims() != [b, t, t] {
            return Err(ModelError::Input(format!(
                "mask must be [{b}, {t}, {t}], got {:?}",
                mask.dims()
            )));
        }
        let ids = ids.to_dtype(DType::U32)?;
        let positions = positions.to_dtype(DType::U32)?;
        let mask = mask.to_dtype(DType::U8)?;
        Ok(Self {
            ids,
            positions,
            mask,
        })
    }

    /// Builds from host data: `rows` of equal length, their positions and a row-major `[B, T, T]` mask.
    pub fn from_host(
        rows: &[Vec<u32>],
        positions: &[Vec<u32>],
        mask: &[u8],
        device: &Device,
    ) -> Result<Self> {
        let b = rows.len();
        let t = rows.first().map_or(0, Vec::len);
        if rows.iter().chain(positions.iter()).any(|r| r.len() != t) || positions.len() != b {
            return Err(ModelError::Input(
                "ids and positions must be rows of one length".into(),
            ));
        }
        if mask.len() != b * t * t {
            return Err(ModelError::Input(format!(
                "mask has {} entries, expected {}",
                mask.len(),
                b * t * t
            )));
        }
        let flat = |r: &[Vec<u32>]| r.iter().flatten().copied().collect::<Vec<u32>>();
        Self::new(
            Tensor::from_vec(flat(rows), (b, t), device)?,
            Tensor::from_vec(flat(positions), (b, t), device)?,
            Tensor::from_vec(mask.to_vec(), (b, t, t), device)?,
        )
    }

    /// Causal rows padded on the right with `pad_id` to the longest row: positions 0.., pad keys masked out;
    /// pad positions attend only to themselves so that no mask row is empty.
    pub fn causal(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let b = rows.len();
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![vec![pad_id; t]; b];
        let mut pos = vec![vec![0u32; t]; b];
        let mut mask = vec![0u8; b * t * t];
        for (r, row) in rows.iter().enumerate() {
            ids[r][..row.len()].copy_from_slice(row);
            for q in 0..t {
                pos[r][q] = q.min(row.len().saturating_sub(1)) as u32;
                let m = &mut mask[(r * t + q) * t..(r * t + q + 1) * t];
                if q < row.len() {
                    m[..=q].fill(1);
                } else {
                    m[q] = 1;
                }
            }
        }
        Self::from_host(&ids, &pos, &mask, device)
    }

    /// Batch size and sequence length.
    pub fn dims(&self) -> (usize, usize) {
        let d = self.ids.dims();
        (d[0], d[1])
    }

    /// Moves all parts to `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            ids: self.ids.to_device(device)?,
            positions: self.positions.to_device(device)?,
            mask: self.mask.to_device(device)?,
        })
    }
}
