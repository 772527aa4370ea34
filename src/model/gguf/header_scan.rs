//! A second walk over the header, only to name the tensor whose type candle rejects: candle's reader stops at an
//! unknown ggml type code without saying which tensor holds it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// Walks the header for the first tensor whose ggml type code candle does not know. `None` when
/// the header cannot be walked (the caller then reports candle's own error).
pub(super) fn find_unknown_tensor_type(path: &Path) -> Option<(String, u32)> {
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut r = BufReader::new(file);
    let magic = read_n(&mut r, 4)?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return None;
    }
    let v1 = read_n(&mut r, 4)? == 1;
    let lp: usize = if v1 { 4 } else { 8 };
    let n_tensors = read_n(&mut r, lp)?;
    let n_kv = read_n(&mut r, lp)?;
    if n_tensors > size || n_kv > size {
        return None;
    }

    pub(super) fn skip(r: &mut BufReader<File>, n: u64, size: u64) -> Option<()> {
        if n > size {
            return None;
        }
        r.seek_relative(i64::try_from(n).ok()?).ok()?;
        Some(())
    }
    pub(super) fn read_n(r: &mut BufReader<File>, n: usize) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..n]).ok()?;
        Some(u64::from_le_bytes(b))
    }
    pub(super) fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        lp: usize,
        size: u64,
        depth: usize,
    ) -> Option<()> {
        if depth > 64 {
            return None;
        }
        match ty {
            0 | 1 | 7 => skip(r, 1, size),
            2 | 3 => skip(r, 2, size),
            4..=6 => skip(r, 4, size),
            10..=12 => skip(r, 8, size),
            8 => {
                let n = read_n(r, lp)?;
                skip(r, n, size)
            }
            9 => {
                let et = read_n(r, 4)? as u32;
                let n = read_n(r, lp)?;
                if n > size {
                    return None;
                }
                for _ in 0..n {
                    skip_value(r, et, lp, size, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    for _ in 0..n_kv {
        let klen = read_n(&mut r, lp)?;
        skip(&mut r, klen, size)?;
        let ty = read_n(&mut r, 4)? as u32;
        skip_value(&mut r, ty, lp, size, 0)?;
    }
    const KNOWN: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];
    for _ in 0..n_tensors {
        let nlen = read_n(&mut r, lp)?;
        if nlen > size || nlen > (1 << 20) {
            return None;
        }
        let mut name = vec![0u8; nlen as usize];
        r.read_exact(&mut name).ok()?;
        let n_dims = read_n(&mut r, 4)?;
        if n_dims > 8 {
            return None;
        }
        skip(&mut r, n_dims * lp as u64, size)?;
        let ty = read_n(&mut r, 4)? as u32;
        skip(&mut r, 8, size)?;
        if !KNOWN.contains(&ty) {
            return Some((String::from_utf8_lossy(&name).into_owned(), ty));
        }
    }
    None
}
