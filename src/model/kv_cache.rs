//! Key/value cache for incremental decoding: each forward appends one (or more) time slots per row, and each
//! query attends to every cached slot of its row from the row's first real slot on (left padding is masked).
//!
//! Rows share one time axis (prompts are left padded to one length). [`KvCache::select_rows`] reorders, duplicates
//! or drops rows between steps: beam search reorders beams by parent, finished rows leave the batch.
//!
//! Two layouts give the same attention:
//! - **host** (CPU): keys and values live in host memory, slot by slot, and every row keeps a table of which
//!   physical row holds each of its slots. Reordering beams copies these small tables, never the cached tensors, and
//!   attention reads the history in place (one pass over K and V per step, no concatenation, no transposed copy).
//! - **tensor** (any device): per layer `K`, `V` of shape `[B, Hkv, T, D]`, appended with `cat` and reordered
//!   with `index_select`, attended with [`layers::attention`] under an explicit `[B, Tq, Tk]` mask.
//!
//! The host attention kernel reads the cache in place; the decode matmuls live in [`super::decode_matmul`]
//! (re-exported here) and the thread pool both use in `decode_pool`.
//!
//! [`layers::attention`]: super::layers::attention

use candle_core::{DType, Device, Tensor};

use super::decode_matmul::dot;
pub use super::decode_matmul::{matmul_rows, step_linear, HostF32, STEP_ROWS_MAX};
use super::decode_pool as pool;
use super::error::{ModelError, Result};
use super::layers::{attention, AttnMask};

/// Per-layer cached keys and values (see the module docs).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: usize,
    /// First real (unpadded) slot of every live row.
    starts: Vec<usize>,
    /// Time slots filled so far (all rows).
    len: usize,
    store: Store,
}

#[derive(Debug, Clone)]
enum Store {
    Host(HostStore),
    Tensor(Vec<Option<(Tensor, Tensor)>>),
}

#[derive(Debug, Clone)]
struct HostStore {
    kv_heads: usize,
    head_dim: usize,
    /// Per layer: keys of all slots, slot after slot; slot `t` holds `rows_at[t]` rows of `[Hkv, D]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Offset (in floats) of each slot in `k[l]` / `v[l]`, and its row count.
    slot_off: Vec<usize>,
    rows_at: Vec<usize>,
    /// `table[r][t]`: the physical row of slot `t` that holds live row `r`'s history.
    table: Vec<Vec<u32>>,
}

/// Shapes of one [`KvCache::attend_rows`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Rows (sequences) and new slots per row.
    pub rows: usize,
    pub tq: usize,
    /// Query heads, key/value heads, head width.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvCache {
    /// A cache for a model of `layers` layers over rows whose first real slot is `starts[r]` (the number of left
    /// pad slots). On the CPU keys and values are kept on the host (`kv_heads`, `head_dim` size them); elsewhere
    /// as tensors.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        starts: Vec<usize>,
        device: &Device,
    ) -> Self {
        if device.is_cpu() {
            Self::new_host(layers, kv_heads, head_dim, starts)
        } else {
            Self::new_tensor(layers, starts)
        }
    }

    /// The host layout (CPU only).
    pub fn new_host(layers: usize, kv_heads: usize, head_dim: usize, starts: Vec<usize>) -> Self {
        let n = starts.len();
        Self {
            layers,
            starts,
            len: 0,
            store: Store::Host(HostStore {
                kv_heads,
                head_dim,
                k: vec![Vec::new(); layers],
                v: vec![Vec::new(); layers],
                slot_off: Vec::new(),
                rows_at: Vec::new(),
                table: vec![Vec::new(); n],
            }),
        }
    }

    /// The tensor layout (any device).
    pub fn new_tensor(layers: usize, starts: Vec<usize>) -> Self {
        Self {
            layers,
            starts,
            len: 0,
            store: Store::Tensor(vec![None; layers]),
        }
    }

    /// Time slots cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Live rows.
    pub fn rows(&self) -> usize {
        self.starts.len()
    }

    /// Whether keys and values are kept on the host.
    pub fn is_host(&self) -> bool {
        matches!(self.store, Store::Host(_))
    }

    /// Keeps rows `idx` (in that order; an index may repeat): row `i` of the result continues old row `idx[i]`.
    pub fn select_rows(&mut self, idx: &[usize]) -> Result<()> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.rows()) {
            return Err(ModelError::Input(format!(
                "kv cache: row {bad} selected from {} rows",
                self.rows()
            )));
        }
        self.starts = idx.iter().map(|&i| self.starts[i]).collect();
        match &mut self.store {
            Store::Host(h) => {
                h.table = idx.iter().map(|&i| h.table[i].clone()).collect();
            }
            Store::Tensor(layers) => {
                if let Some(dev) = layers
                    .iter()
                    .flatten()
                    .next()
                    .map(|(k, _)| k.device().clone())
                {
                    let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                    let ids = Tensor::new(ids.as_slice(), &dev)?;
                    for (k, v) in layers.iter_mut().flatten() {
                        *k = k.index_select(&ids, 0)?;
                        *v = v.index_select(&ids, 0)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn check_layer(&self, layer: usize, heads: usize, kv_heads: usize) -> Result<()> {
        if layer >= self.layers || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ModelError::Input(format!(
                "kv cache: layer {layer} of {}, {heads} heads over {kv_heads} kv heads",
                self.layers
            )));
        }
        Ok(())
    }

    /// After the last layer of a forward: the new slots belong to the rows' histories.
    fn finish_layer(&mut self, layer: usize, tq: usize) {
        if layer + 1 == self.layers {
            if let Store::Host(store) = &mut self.store {
                for (r, t) in store.table.iter_mut().enumerate() {
                    t.extend(std::iter::repeat_n(r as u32, tq));
                }
            }
            self.len += tq;
        }
    }

    /// Appends this forward's keys and values of `layer` (`k`, `v`: `[B, Hkv, Tq, D]`, the new slots) and returns
    /// the attention output `[B, H, Tq, D]` of `q` (`[B, H, Tq, D]`) over the row's cached and new slots: query `i`
    /// sees the slots from the row's start up to its own. Call for layers `0..layers` in order; the cache
    /// advances by `Tq` slots after the last layer.
    pub fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (b, h, tq, d) = q.dims4()?;
        let (bk, hkv, tk, dk) = k.dims4()?;
        if b != self.rows() || bk != b || tk != tq || dk != d || v.dims() != k.dims() {
            return Err(ModelError::Input(format!(
                "kv cache: q {:?}, k {:?}, v {:?} for {} rows",
                q.dims(),
                k.dims(),
                v.dims(),
                self.rows()
            )));
        }
        self.check_layer(layer, h, hkv)?;
        if self.is_host() {
            // [B, Tq, heads, D] rows on the host.
            let host = |x: &Tensor| -> Result<Vec<f32>> {
                Ok(x.to_dtype(DType::F32)?
                    .transpose(1, 2)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            };
            let dims = AttnDims {
                rows: b,
                tq,
                heads: h,
                kv_heads: hkv,
                head_dim: d,
            };
            let out =
                self.attend_rows(layer, &host(q)?, &host(k)?, &host(v)?, dims, scale as f32)?;
            return Ok(Tensor::from_vec(out, (b, tq, h, d), q.device())?
                .transpose(1, 2)?
                .to_dtype(q.dtype())?);
        }
        let base = self.len;
        let Store::Tensor(layers) = &mut self.store else {
            unreachable!("host layout handled above")
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let (k_all, v_all) = match &layers[layer] {
            Some((k0, v0)) => (Tensor::cat(&[k0, &k], 2)?, Tensor::cat(&[v0, &v], 2)?),
            None => (k, v),
        };
        let total = base + tq;
        let mut mask = vec![0u8; b * tq * total];
        for r in 0..b {
            for i in 0..tq {
                let row = &mut mask[(r * tq + i) * total..(r * tq + i + 1) * total];
                let qslot = base + i;
                if qslot < self.starts[r] {
                    row[qslot] = 1; // a pad query: itself only, so no row is empty
                } else {
                    row[self.starts[r]..=qslot].fill(1);
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, tq, total), q.device())?;
        let out = attention(q, &k_all, &v_all, &AttnMask::new(&mask)?, scale)?;
        layers[layer] = Some((k_all, v_all));
        self.finish_layer(layer, tq);
        Ok(out)
    }

    /// [`KvCache::attend`] on host rows (host layout only): `q` is `[B, Tq, H, D]`, `k` and `v` are
    /// `[B, Tq, Hkv, D]` (the layouts a projection produces); returns `[B, Tq, H, D]`.
    pub fn attend_rows(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: AttnDims,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let AttnDims {
            rows: b,
            tq,
            heads: h,
            kv_heads: hkv,
            head_dim: d,
        } = dims;
        self.check_layer(layer, h, hkv)?;
        let base = self.len;
        let Store::Host(store) = &mut self.store else {
            return Err(ModelError::Input(
                "kv cache: attend_rows needs the host layout".into(),
            ));
        };
        if store.kv_heads != hkv || store.head_dim != d {
            return Err(ModelError::Input(format!(
                "kv cache: built for {} kv heads of {}, got {hkv} of {d}",
                store.kv_heads, store.head_dim
            )));
        }
        if b != self.starts.len()
            || q.len() != b * tq * h * d
            || k.len() != b * tq * hkv * d
            || v.len() != k.len()
        {
            return Err(ModelError::Input(format!(
                "kv cache: {} / {} / {} values for {dims:?} and {} rows",
                q.len(),
                k.len(),
                v.len(),
                self.starts.len()
            )));
        }
        if layer == 0 {
            // New slots: their offsets and row counts, shared by all layers.
            for _ in 0..tq {
                let off = store
                    .slot_off
                    .last()
                    .zip(store.rows_at.last())
                    .map_or(0, |(o, r)| o + r * hkv * d);
                store.slot_off.push(off);
                store.rows_at.push(b);
            }
        }
        store.append(layer, base, k, v, b, tq);
        let out = store.attend(layer, q, dims, base, &self.starts, scale);
        self.finish_layer(layer, tq);
        Ok(out)
    }
}

impl HostStore {
    /// Writes keys and values `[B, Tq, Hkv, D]` into slots `base..base + Tq` of `layer`, row r at physical row r.
    fn append(&mut self, layer: usize, base: usize, k: &[f32], v: &[f32], b: usize, tq: usize) {
        let row_len = self.kv_heads * self.head_dim;
        let end = self.slot_off[base + tq - 1] + self.rows_at[base + tq - 1] * row_len;
        for (store, x) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            store.resize(end, 0.0);
            for r in 0..b {
                for i in 0..tq {
                    let dst = self.slot_off[base + i] + r * row_len;
                    let src = (r * tq + i) * row_len;
                    store[dst..dst + row_len].copy_from_slice(&x[src..src + row_len]);
                }
            }
        }
    }

    /// Attention of host queries `q` (`[B, Tq, H, D]`) for the slots `base..base + Tq` just appended; returns
    /// `[B, Tq, H, D]`. Rows are spread over the thread pool.
    fn attend(
        &self,
        layer: usize,
        q: &[f32],
        dims: AttnDims,
        base: usize,
        starts: &[usize],
        scale: f32,
    ) -> Vec<f32> {
        let AttnDims {
            rows: b,
            tq,
            heads: h,
            kv_heads: hkv,
            head_dim: d,
        } = dims;
        let mut out = vec![0f32; b * tq * h * d];
        let ctx = RowAttention {
            q,
            ks: &self.k[layer],
            vs: &self.v[layer],
            table: &self.table,
            slot_off: &self.slot_off,
            starts,
            h,
            group: h / hkv,
            hkv,
            d,
            tq,
            base,
            scale,
        };
        let row = tq * h * d;
        let cost = b * tq * h * (base + tq) * d;
        let chunks = if cost < 1 << 17 {
            1
        } else {
            pool::threads().min(b)
        };
        let per = b.div_ceil(chunks.max(1)).max(1);
        let parts: Vec<std::sync::Mutex<&mut [f32]>> = out
            .chunks_mut(per * row)
            .map(std::sync::Mutex::new)
            .collect();
        pool::run(parts.len(), &|c| {
            let mut part = parts[c].lock().unwrap_or_else(|e| e.into_inner());
            let mut scores = Vec::new();
            for (j, o) in part.chunks_mut(row).enumerate() {
                ctx.run(c * per + j, o, &mut scores);
            }
        });
        drop(parts);
        out
    }
}

/// What the attention of one row (its Tq queries, all heads) reads.
struct RowAttention<'a> {
    q: &'a [f32],
    ks: &'a [f32],
    vs: &'a [f32],
    table: &'a [Vec<u32>],
    slot_off: &'a [usize],
    starts: &'a [usize],
    h: usize,
    group: usize,
    hkv: usize,
    d: usize,
    tq: usize,
    base: usize,
    scale: f32,
}

impl RowAttention<'_> {
    /// Row `r` into `o` (`[Tq, H, D]`), compiled for the widest SIMD level the CPU has.
    fn run(&self, r: usize, o: &mut [f32], scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn v4(it: &RowAttention, r: usize, o: &mut [f32], scores: &mut Vec<f32>) {
                it.run_generic(r, o, scores)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn v3(it: &RowAttention, r: usize, o: &mut [f32], scores: &mut Vec<f32>) {
                it.run_generic(r, o, scores)
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature was detected at run time.
                return unsafe { v4(self, r, o, scores) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features were detected at run time.
                return unsafe { v3(self, r, o, scores) };
            }
        }
        self.run_generic(r, o, scores)
    }

    #[inline(always)]
    fn run_generic(&self, r: usize, o: &mut [f32], scores: &mut Vec<f32>) {
        let (h, d) = (self.h, self.d);
        let start = self.starts[r];
        let mut offs: Vec<usize> = Vec::with_capacity(self.base + self.tq);
        o.fill(0.0);
        for i in 0..self.tq {
            let qslot = self.base + i;
            if qslot < start {
                continue; // a pad query: no key is visible, its output is never used
            }
            // Offsets of this row's slots start..=qslot (kv head 0). Plain loops: closures would not inherit
            // the caller's target features.
            offs.clear();
            for t in start..=qslot {
                let phys = if t < self.base {
                    self.table[r][t] as usize
                } else {
                    r
                };
                offs.push(self.slot_off[t] + phys * self.hkv * d);
            }
            for hh in 0..h {
                let hk = (hh / self.group) * d;
                let qv = &self.q[((r * self.tq + i) * h + hh) * d..][..d];
                scores.clear();
                let mut mx = f32::NEG_INFINITY;
                for &t in offs.iter() {
                    let s = dot(qv, &self.ks[t + hk..t + hk + d]) * self.scale;
                    mx = if s > mx { s } else { mx };
                    scores.push(s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = exp_f32(*s - mx);
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let ov = &mut o[(i * h + hh) * d..(i * h + hh + 1) * d];
                for j in 0..offs.len() {
                    let t = offs[j] + hk;
                    axpy(scores[j] * inv, &self.vs[t..t + d], ov);
                }
            }
        }
    }
}

/// `o += a·x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], o: &mut [f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o += a * x;
    }
}

/// `e^x` to about 2 ulp for x ≤ 88 (0 below −87), branch-free so that loops over it vectorise: x = n·ln2 + r,
/// `e^r` by a degree-6 polynomial on |r| ≤ ln2/2, `2^n` through the exponent bits.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let below = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_452 + r * 0.001_388_89)))));
    let bits = ((n as i32 + 127) as u32) << 23;
    let e = p * f32::from_bits(bits);
    if below {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// One forward of `tq` slots through both layouts; outputs compared at real query slots.
    fn step(host: &mut KvCache, tens: &mut KvCache, tq: usize, seed: u64) {
        let (h, hkv, d) = (4, 2, 8);
        let b = host.rows();
        let base = host.len();
        let starts = host.starts.clone();
        for layer in 0..2 {
            let s = seed + 10 * layer as u64;
            let q = rand(&[b, h, tq, d], s);
            let k = rand(&[b, hkv, tq, d], s + 1);
            let v = rand(&[b, hkv, tq, d], s + 2);
            let a = flat(&host.attend(layer, &q, &k, &v, 0.35).unwrap());
            let t = flat(&tens.attend(layer, &q, &k, &v, 0.35).unwrap());
            for (r, &start) in starts.iter().enumerate() {
                for i in (0..tq).filter(|&i| base + i >= start) {
                    for hh in 0..h {
                        let o = ((r * h + hh) * tq + i) * d;
                        for j in o..o + d {
                            assert!(
                                (a[j] - t[j]).abs() < 1e-5,
                                "row {r} slot {} head {hh}: {} vs {}",
                                base + i,
                                a[j],
                                t[j]
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(host.len(), base + tq);
        assert_eq!(tens.len(), base + tq);
    }

    /// Host and tensor layouts give the same attention through a prefill, steps, a beam-style reorder with
    /// duplicated rows and a compaction.
    #[test]
    fn host_and_tensor_layouts_agree() {
        let starts = vec![2, 0, 3];
        let mut host = KvCache::new_host(2, 2, 8, starts.clone());
        let mut tens = KvCache::new_tensor(2, starts);
        step(&mut host, &mut tens, 5, 1);
        for (n, idx) in [vec![0, 0, 1, 2, 2, 2], vec![5, 1, 1, 0, 3, 2], vec![4, 0]]
            .iter()
            .enumerate()
        {
            host.select_rows(idx).unwrap();
            tens.select_rows(idx).unwrap();
            step(&mut host, &mut tens, 1, 100 + n as u64 * 7);
            step(&mut host, &mut tens, 1, 200 + n as u64 * 7);
        }
        assert!(host.select_rows(&[7]).is_err());
    }
}
