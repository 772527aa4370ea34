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

use candle_core::{DType, Device, Tensor};

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
                if layers.iter().any(Option::is_some) {
                    let dev = layers
                        .iter()
                        .flatten()
                        .next()
                        .map(|(k, _)| k.device().clone());
                    let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
                    let ids = Tensor::new(ids.as_slice(), &dev.unwrap_or(Device::Cpu))?;
                    for (k, v) in layers.iter_mut().flatten() {
                        *k = k.index_select(&ids, 0)?;
                        *v = v.index_select(&ids, 0)?;
                    }
                }
            }
        }
        Ok(())
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
        if layer >= self.layers || h % hkv != 0 {
            return Err(ModelError::Input(format!(
                "kv cache: layer {layer} of {}, {h} heads over {hkv} kv heads",
                self.layers
            )));
        }
        let base = self.len;
        let out = match &mut self.store {
            Store::Host(store) => {
                if store.kv_heads != hkv || store.head_dim != d {
                    return Err(ModelError::Input(format!(
                        "kv cache: built for {} kv heads of {}, got {hkv} of {d}",
                        store.kv_heads, store.head_dim
                    )));
                }
                if layer == 0 {
                    // New slots: their offsets and row counts, shared by all layers.
                    for i in 0..tq {
                        let off = store
                            .slot_off
                            .last()
                            .zip(store.rows_at.last())
                            .map_or(0, |(o, r)| o + r * hkv * d);
                        debug_assert_eq!(store.slot_off.len(), base + i);
                        store.slot_off.push(off);
                        store.rows_at.push(b);
                    }
                }
                store.append(layer, base, k, v)?;
                let qh = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let out = store.attend(layer, &qh, (b, h, tq), base, &self.starts, scale as f32);
                Tensor::from_vec(out, (b, h, tq, d), q.device())?.to_dtype(q.dtype())?
            }
            Store::Tensor(layers) => {
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
                out
            }
        };
        if layer + 1 == self.layers {
            if let Store::Host(store) = &mut self.store {
                for (r, t) in store.table.iter_mut().enumerate() {
                    t.extend(std::iter::repeat_n(r as u32, tq));
                }
            }
            self.len += tq;
        }
        Ok(out)
    }
}

impl HostStore {
    /// Writes `k`, `v` (`[B, Hkv, Tq, D]`) into slots `base..base + Tq` of `layer`, row r at physical row r.
    fn append(&mut self, layer: usize, base: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, hkv, tq, d) = k.dims4()?;
        let end = self.slot_off[base + tq - 1] + self.rows_at[base + tq - 1] * hkv * d;
        for (store, x) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            // [B, Tq, Hkv, D]: one slot's rows are then contiguous runs of Hkv·D.
            let host = x
                .to_dtype(DType::F32)?
                .transpose(1, 2)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            store.resize(end, 0.0);
            let row_len = hkv * d;
            for r in 0..b {
                for i in 0..tq {
                    let dst = self.slot_off[base + i] + r * row_len;
                    let src = (r * tq + i) * row_len;
                    store[dst..dst + row_len].copy_from_slice(&host[src..src + row_len]);
                }
            }
        }
        Ok(())
    }

    /// Attention of host queries `q` (`[B, H, Tq, D]`) for the slots `base..base + Tq` just appended.
    fn attend(
        &self,
        layer: usize,
        q: &[f32],
        (b, h, tq): (usize, usize, usize),
        base: usize,
        starts: &[usize],
        scale: f32,
    ) -> Vec<f32> {
        let d = self.head_dim;
        let hkv = self.kv_heads;
        let group = h / hkv;
        let (ks, vs) = (&self.k[layer], &self.v[layer]);
        let mut out = vec![0f32; b * h * tq * d];
        // One work item = one (row, head): its Tq queries.
        let item = tq * d;
        let work = |idx: usize, o: &mut [f32], scores: &mut Vec<f32>| {
            let (r, hh) = (idx / h, idx % h);
            let hk = hh / group;
            let start = starts[r];
            for i in 0..tq {
                let qslot = base + i;
                let o = &mut o[i * d..(i + 1) * d];
                o.fill(0.0);
                if qslot < start {
                    continue; // a pad query: no key is visible, its output is never used
                }
                let qv = &q[((r * h + hh) * tq + i) * d..][..d];
                let at = |t: usize| -> usize {
                    let phys = if t < base {
                        self.table[r][t] as usize
                    } else {
                        r
                    };
                    self.slot_off[t] + (phys * hkv + hk) * d
                };
                scores.clear();
                let mut mx = f32::NEG_INFINITY;
                for t in start..=qslot {
                    let s = dot(qv, &ks[at(t)..at(t) + d]) * scale;
                    mx = mx.max(s);
                    scores.push(s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - mx).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                for (t, &p) in (start..=qslot).zip(scores.iter()) {
                    axpy(p * inv, &vs[at(t)..at(t) + d], o);
                }
            }
        };
        let items = b * h;
        let cost = items * tq * (base + tq) * d;
        let threads = candle_core::utils::get_num_threads().clamp(1, items.max(1));
        if threads == 1 || cost < 1 << 16 {
            let mut scores = Vec::new();
            for (idx, o) in out.chunks_mut(item).enumerate() {
                work(idx, o, &mut scores);
            }
        } else {
            let per = items.div_ceil(threads);
            std::thread::scope(|s| {
                for (ci, chunk) in out.chunks_mut(per * item).enumerate() {
                    let work = &work;
                    s.spawn(move || {
                        let mut scores = Vec::new();
                        for (j, o) in chunk.chunks_mut(item).enumerate() {
                            work(ci * per + j, o, &mut scores);
                        }
                    });
                }
            });
        }
        out
    }
}

/// `Σ a[i]·b[i]` over 8 independent lanes (so the loop vectorises).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
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
#[inline]
fn axpy(a: f32, x: &[f32], o: &mut [f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o += a * x;
    }
}

/// Decoding steps multiply a few rows (one token per sequence) by every weight matrix, so the step is bound by
/// reading the weights. `x @ Wᵀ` for `x` of at most this many rows reads each weight row once, in place, through
/// [`step_linear`]; larger inputs (prefill) take the general matmul.
pub const STEP_ROWS_MAX: usize = 32;

/// `x @ Wᵀ (+ b)` over the last dimension for `W` in `nn.Linear` layout `[out, in]`: on the CPU in f32 with few
/// rows, a kernel that streams each weight row once (4×4 register tiles); otherwise the general matmul.
pub fn step_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let m: usize = dims[..dims.len() - 1].iter().product();
    let (n, kw) = w.dims2()?;
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.is_contiguous()
        && kw == k
        && m <= STEP_ROWS_MAX;
    let y = if fast {
        let x2 = x.reshape((m, k))?.contiguous()?;
        x2.apply_op2_no_bwd(w, &RowsTimesWeights)?
    } else {
        super::layers::matmul_2d(&x.reshape((m, k))?, &w.t()?)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    let y = y.reshape(out_dims)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `[M, K] × [N, K]ᵀ → [M, N]`, f32 on the CPU (see [`step_linear`]).
struct RowsTimesWeights;

impl candle_core::CustomOp2 for RowsTimesWeights {
    fn name(&self) -> &'static str {
        "rows-times-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (s1, s2) else {
            candle_core::bail!("rows-times-weights: f32 only")
        };
        let (Some((xa, xb)), Some((wa, wb))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("rows-times-weights: inputs must be contiguous")
        };
        let (x, w) = (&xs[xa..xb], &ws[wa..wb]);
        let (m, k) = l1.shape().dims2()?;
        let (n, _) = l2.shape().dims2()?;
        // Output transposed ([N, M]: each thread owns a contiguous run of weight rows), then turned around.
        let mut yt = vec![0f32; n * m];
        let threads = candle_core::utils::get_num_threads().clamp(1, n.div_ceil(64).max(1));
        let per = n.div_ceil(threads).next_multiple_of(4);
        if threads == 1 {
            rows_times_weights(x, m, k, w, &mut yt);
        } else {
            std::thread::scope(|s| {
                for (c, yc) in yt.chunks_mut(per * m).enumerate() {
                    let rows = yc.len() / m;
                    let wc = &w[c * per * k..(c * per + rows) * k];
                    s.spawn(move || rows_times_weights(x, m, k, wc, yc));
                }
            });
        }
        let mut y = vec![0f32; m * n];
        for (o, col) in yt.chunks_exact(m).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[i * n + o] = v;
            }
        }
        Ok((CpuStorage::F32(y), candle_core::Shape::from((m, n))))
    }
}

/// `yt[o][i] = Σ_k x[i][k] · w[o][k]` for the weight rows of `w`, dispatched to the widest SIMD level.
fn rows_times_weights(x: &[f32], m: usize, k: usize, w: &[f32], yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn v4(x: &[f32], m: usize, k: usize, w: &[f32], yt: &mut [f32]) {
            rows_times_weights_generic(x, m, k, w, yt)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn v3(x: &[f32], m: usize, k: usize, w: &[f32], yt: &mut [f32]) {
            rows_times_weights_generic(x, m, k, w, yt)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected at run time.
            return unsafe { v4(x, m, k, w, yt) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { v3(x, m, k, w, yt) };
        }
    }
    rows_times_weights_generic(x, m, k, w, yt)
}

#[inline(always)]
fn rows_times_weights_generic(x: &[f32], m: usize, k: usize, w: &[f32], yt: &mut [f32]) {
    const L: usize = 16;
    let n = w.len() / k.max(1);
    let kv = k / L * L;
    let mut o = 0;
    while o < n {
        let ob = (n - o).min(4);
        let mut i = 0;
        while i < m {
            let ib = (m - i).min(4);
            let mut acc = [[[0f32; L]; 4]; 4];
            let mut kk = 0;
            while kk < kv {
                let mut xv = [[0f32; L]; 4];
                for (a, xr) in xv.iter_mut().enumerate().take(ib) {
                    xr.copy_from_slice(&x[(i + a) * k + kk..(i + a) * k + kk + L]);
                }
                for b in 0..ob {
                    let wr: &[f32; L] = w[(o + b) * k + kk..(o + b) * k + kk + L].try_into().unwrap();
                    for a in 0..4 {
                        for l in 0..L {
                            acc[b][a][l] += wr[l] * xv[a][l];
                        }
                    }
                }
                kk += L;
            }
            for b in 0..ob {
                for a in 0..ib {
                    let mut s: f32 = acc[b][a].iter().sum();
                    for kr in kv..k {
                        s += w[(o + b) * k + kr] * x[(i + a) * k + kr];
                    }
                    yt[(o + b) * m + i + a] = s;
                }
            }
            i += 4;
        }
        o += 4;
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
            for r in 0..b {
                for i in (0..tq).filter(|&i| base + i >= starts[r]) {
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
