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
//! The module also holds the CPU kernels of a decoding step, which multiplies a few rows (one token per
//! sequence) by every weight matrix and is therefore bound by reading the weights: [`step_linear`] /
//! [`matmul_rows`] stream each weight row once, in place, over a persistent thread pool.
//!
//! [`layers::attention`]: super::layers::attention

use candle_core::{CpuStorage, DType, Device, Storage, StorageRef, Tensor};

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

/// `Σ a[i]·b[i]` over 16 independent lanes (so the loop vectorises).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
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

/// A contiguous f32 CPU tensor's data, borrowed in place.
pub struct HostF32<'a> {
    guard: StorageRef<'a>,
    range: (usize, usize),
}

impl<'a> HostF32<'a> {
    /// `None` unless `t` is a contiguous f32 tensor on the CPU.
    pub fn new(t: &'a Tensor) -> Option<Self> {
        let (guard, layout) = t.storage_and_layout();
        let range = layout.contiguous_offsets()?;
        matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))).then_some(Self { guard, range })
    }

    /// The values.
    pub fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => unreachable!("checked in new"),
        }
    }
}

/// Decoding steps multiply a few rows (one token per sequence) by every weight matrix, so the step is bound by
/// reading the weights. `x @ Wᵀ` for `x` of at most this many rows reads each weight row once, in place, through
/// [`step_linear`]; larger inputs (prefill) take the general matmul.
pub const STEP_ROWS_MAX: usize = 32;

/// `x @ Wᵀ (+ b)` over the last dimension for `W` in `nn.Linear` layout `[out, in]`: on the CPU in f32 with few
/// rows, [`matmul_rows`]; otherwise the general matmul.
pub fn step_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let (n, kw) = w.dims2()?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    if x.device().is_cpu() && x.dtype() == DType::F32 && kw == k && m <= STEP_ROWS_MAX {
        if let Some(wh) = HostF32::new(w) {
            let xh = x.flatten_all()?.to_vec1::<f32>()?;
            let y = matmul_rows(&xh, m, k, wh.get());
            let y = Tensor::from_vec(y, out_dims, x.device())?;
            return Ok(match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
    }
    let y = super::layers::matmul_2d(&x.reshape((m, k))?, &w.t()?)?.reshape(out_dims)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `x @ Wᵀ` for host rows `x` (`[m, k]`) and weights `w` (`[n, k]`, `nn.Linear` layout): `[m, n]`. Each weight
/// row is read once (AVX-512 4×4 register tiles where available), spread over the thread pool.
pub fn matmul_rows(x: &[f32], m: usize, k: usize, w: &[f32]) -> Vec<f32> {
    let n = w.len() / k.max(1);
    assert!(x.len() == m * k && w.len() == n * k, "matmul_rows: shapes");
    // Output transposed ([n, m]: each task owns a contiguous run of weight rows), then turned around.
    let mut yt = vec![0f32; n * m];
    let chunks = pool::threads().clamp(1, n.div_ceil(64).max(1));
    let per = n.div_ceil(chunks).next_multiple_of(4);
    let parts: Vec<std::sync::Mutex<&mut [f32]>> =
        yt.chunks_mut(per * m).map(std::sync::Mutex::new).collect();
    pool::run(parts.len(), &|c| {
        let mut yc = parts[c].lock().unwrap_or_else(|e| e.into_inner());
        let rows = yc.len() / m;
        rows_times_weights(x, m, k, &w[c * per * k..(c * per + rows) * k], &mut yc);
    });
    drop(parts);
    if m == 1 {
        return yt;
    }
    let mut y = vec![0f32; m * n];
    for (o, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            y[i * n + o] = v;
        }
    }
    y
}

/// `yt[o][i] = Σ_k x[i][k] · w[o][k]` for the weight rows of `w`: AVX-512 register tiles where the CPU has
/// them, else plain loops.
fn rows_times_weights(x: &[f32], m: usize, k: usize, w: &[f32], yt: &mut [f32]) {
    let n = w.len() / k.max(1);
    debug_assert!(x.len() >= m * k && yt.len() >= n * m);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let mut o = 0;
        while o < n {
            let ob = (n - o).min(4);
            let mut i = 0;
            while i < m {
                let ib = (m - i).min(4);
                // SAFETY: avx512f was detected; the tile reads rows i..i+ib of x and o..o+ob of w, in bounds.
                unsafe {
                    match (ob, ib) {
                        (4, 4) => avx512::tile::<4, 4>(x, k, w, i, o, m, yt),
                        (4, 3) => avx512::tile::<4, 3>(x, k, w, i, o, m, yt),
                        (4, 2) => avx512::tile::<4, 2>(x, k, w, i, o, m, yt),
                        (4, 1) => avx512::tile::<4, 1>(x, k, w, i, o, m, yt),
                        _ => {
                            for b in 0..ob {
                                for a in 0..ib {
                                    avx512::tile::<1, 1>(x, k, w, i + a, o + b, m, yt);
                                }
                            }
                        }
                    }
                }
                i += 4;
            }
            o += 4;
        }
        return;
    }
    for o in 0..n {
        let wr = &w[o * k..(o + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            yt[o * m + i] = dot(wr, xr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `yt[(o+b)·m + i+a] = w[o+b] · x[i+a]` for b < R, a < C.
    ///
    /// # Safety
    /// The CPU must support avx512f; rows `i..i+C` of `x` and `o..o+R` of `w` (each `k` long) and the written
    /// entries of `yt` must be in bounds.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        k: usize,
        w: &[f32],
        i: usize,
        o: usize,
        m: usize,
        yt: &mut [f32],
    ) {
        assert!(
            (i + C) * k <= x.len() && (o + R) * k <= w.len() && (o + R - 1) * m + i + C <= yt.len()
        );
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let kv = k / 16 * 16;
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut kk = 0;
        while kk < kv {
            let mut xv = [_mm512_setzero_ps(); C];
            for (a, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add((i + a) * k + kk));
            }
            for (b, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_ps(wp.add((o + b) * k + kk));
                for (a, acc) in row.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(wv, xv[a], *acc);
                }
            }
            kk += 16;
        }
        for (b, row) in acc.iter().enumerate() {
            for (a, &v) in row.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(v);
                for kr in kv..k {
                    s += *wp.add((o + b) * k + kr) * *xp.add((i + a) * k + kr);
                }
                yt[(o + b) * m + i + a] = s;
            }
        }
    }
}

/// A persistent pool of `threads − 1` workers for the decode kernels: a step runs ~60 small parallel loops, and
/// spawning threads for each would cost more than some of the loops.
mod pool {
    use std::collections::VecDeque;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::{Arc, Condvar, Mutex, OnceLock};

    type Body = dyn Fn(usize) + Sync;

    struct Task {
        body: &'static Body,
        index: usize,
        latch: Arc<Latch>,
    }

    /// Tasks left of one `run` call, and whether one panicked.
    struct Latch {
        left: Mutex<(usize, bool)>,
        done: Condvar,
    }

    struct Pool {
        queue: Mutex<VecDeque<Task>>,
        ready: Condvar,
        threads: usize,
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pool() -> &'static Pool {
        static POOL: OnceLock<&'static Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let threads = candle_core::utils::get_num_threads().max(1);
            let p: &'static Pool = Box::leak(Box::new(Pool {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                threads,
            }));
            for i in 1..threads {
                let spawned = std::thread::Builder::new()
                    .name(format!("rrhf-decode-{i}"))
                    .spawn(move || loop {
                        let task = {
                            let mut q = lock(&p.queue);
                            loop {
                                match q.pop_front() {
                                    Some(t) => break t,
                                    None => q = p.ready.wait(q).unwrap_or_else(|e| e.into_inner()),
                                }
                            }
                        };
                        execute(task);
                    });
                if spawned.is_err() {
                    break; // fewer workers: the caller runs what is left itself
                }
            }
            p
        })
    }

    fn execute(t: Task) {
        let ok = catch_unwind(AssertUnwindSafe(|| (t.body)(t.index))).is_ok();
        let mut g = lock(&t.latch.left);
        g.0 -= 1;
        g.1 |= !ok;
        if g.0 == 0 {
            t.latch.done.notify_all();
        }
    }

    /// Threads a parallel loop may use (the calling thread included).
    pub fn threads() -> usize {
        pool().threads
    }

    /// Runs `body(0..n)`, spread over the pool and the calling thread; returns when all are done.
    pub fn run<'a>(n: usize, body: &'a (dyn Fn(usize) + Sync + 'a)) {
        if n <= 1 || threads() == 1 {
            (0..n).for_each(body);
            return;
        }
        let p = pool();
        // SAFETY: the reference is used by tasks only, and this function does not return before every task of
        // this call has finished (the latch), so it never outlives `body`.
        let body: &'static Body =
            unsafe { std::mem::transmute::<&'a (dyn Fn(usize) + Sync + 'a), &'static Body>(body) };
        let latch = Arc::new(Latch {
            left: Mutex::new((n - 1, false)),
            done: Condvar::new(),
        });
        {
            let mut q = lock(&p.queue);
            for index in 1..n {
                q.push_back(Task {
                    body,
                    index,
                    latch: latch.clone(),
                });
            }
        }
        p.ready.notify_all();
        let first = catch_unwind(AssertUnwindSafe(|| body(0)));
        // Help with queued tasks (ours or another caller's) rather than wait idle.
        loop {
            let task = lock(&p.queue).pop_front();
            match task {
                Some(t) => execute(t),
                None => break,
            }
        }
        let mut g = lock(&latch.left);
        while g.0 > 0 {
            g = latch.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.1 {
            panic!("a decode kernel task panicked");
        }
        drop(g);
        if let Err(e) = first {
            std::panic::resume_unwind(e);
        }
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
