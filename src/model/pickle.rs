//! PyTorch pickle checkpoints (`.pt`, `.pth`, `.bin`, `.ckpt`; the zip format of `torch.save`): tensors read through
//! candle's unpickler after checks that keep a corrupt file from panicking or allocating beyond its size. Used by
//! the reward-model loader next to the safetensors reader of `weights.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::{ModelError, Result};

pub(crate) fn is_pickle(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "pt" | "pth" | "bin" | "ckpt"))
}

/// Non-parameter buffers that old checkpoints carry (causal-mask tables, rotary caches).
pub(crate) fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
        || name.ends_with("embed_positions")
        || name.ends_with("position_ids")
}

/// The most a deflated zip entry can expand (deflate's limit is about 1032:1): bounds a tensor's size by its file's.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Walks a pickle program over the opcodes candle's unpickler knows and checks every length-prefixed argument
/// against the bytes that remain: candle allocates a `BINUNICODE` string's claimed length (up to 4 GiB) before
/// reading it, so a corrupt length would abort the process instead of failing. Stops at `STOP` or at an opcode
/// candle does not know (candle then reports it).
fn check_pickle_lengths(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let arg = |i: usize, n: usize| -> std::result::Result<&[u8], String> {
        p.get(i..i.saturating_add(n)).ok_or_else(|| {
            format!(
                "truncated pickle: opcode at byte {} needs {n} more bytes",
                i - 1
            )
        })
    };
    while let Some(&op) = p.get(i) {
        i += 1;
        let skip = match op {
            b'.' => return Ok(()),
            0x80 | b'q' | b'K' | b'h' => 1,
            b'M' => 2,
            b'r' | b'J' | b'j' => 4,
            b'G' => 8,
            b'X' => {
                let len = u32::from_le_bytes(arg(i, 4)?.try_into().unwrap_or_default()) as usize;
                if len > p.len() - i - 4 {
                    return Err(format!(
                        "a string at byte {} claims {len} bytes, but only {} remain: the file is corrupt",
                        i - 1,
                        p.len() - i - 4
                    ));
                }
                4 + len
            }
            0x8a => {
                // candle shifts each byte into an i64 by 8·index: more than 8 bytes overflows the shift (a panic
                // in builds with overflow checks) and could not be an int candle represents anyway.
                let n = arg(i, 1)?[0];
                if n > 8 {
                    return Err(format!(
                        "an integer at byte {} has {n} bytes, more than the 8 of a 64-bit integer: the file is \
                         corrupt",
                        i - 1
                    ));
                }
                1 + usize::from(n)
            }
            b'c' => {
                // Module and class names, each up to a newline.
                let mut k = i;
                for _ in 0..2 {
                    k += p[k.min(p.len())..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| {
                            format!("truncated pickle: unterminated GLOBAL at byte {}", i - 1)
                        })?
                        + 1;
                }
                k - i
            }
            b')'
            | b'R'
            | b'('
            | b't'
            | b'Q'
            | 0x85..=0x89
            | b'N'
            | b's'
            | b'u'
            | b'}'
            | b'd'
            | b'b'
            | 0x81
            | b']'
            | b'a'
            | b'e' => 0,
            _ => return Ok(()),
        };
        arg(i, skip)?;
        i += skip;
    }
    Ok(())
}

/// Checks the argument tuples that candle's `into_tensor_info` takes apart by index (it `remove`s positions
/// without checking the length, so a corrupt pickle with a short tuple panics there): the same walk, by
/// reference, requiring each tuple to be long enough. Values that are not tensors pass (candle skips them).
fn check_tensor_args(v: &candle_core::pickle::Object) -> std::result::Result<(), String> {
    use candle_core::pickle::Object;
    fn tuple<'a>(
        o: &'a Object,
        what: &str,
        min: usize,
    ) -> std::result::Result<&'a [Object], String> {
        match o {
            Object::Tuple(t) if t.len() >= min => Ok(t),
            Object::Tuple(t) => Err(format!(
                "{what} has {} entries, expected at least {min}: the pickle is corrupt",
                t.len()
            )),
            // Not a tuple: candle reports the type itself.
            _ => Ok(&[]),
        }
    }
    let is = |o: &Object, m: &str, c: &str| matches!(o, Object::Class { module_name, class_name } if module_name == m && class_name == c);
    let Object::Reduce { callable, args } = v else {
        return Ok(());
    };
    let (mut callable, mut args): (&Object, &Object) = (callable, args);
    if is(callable, "torch._tensor", "_rebuild_from_type_v2") {
        // remove(0), then remove(1) of the rest: the original's entries 0 and 2.
        let t = tuple(args, "_rebuild_from_type_v2's arguments", 3)?;
        if t.is_empty() {
            return Ok(());
        }
        (callable, args) = (&t[0], &t[2]);
    } else if is(callable, "torch._utils", "_rebuild_parameter") {
        let t = tuple(args, "_rebuild_parameter's arguments", 1)?;
        match t.first() {
            Some(Object::Reduce {
                callable: c,
                args: a,
            }) => (callable, args) = (c, a),
            _ => return Ok(()),
        }
    }
    if !is(callable, "torch._utils", "_rebuild_tensor_v2") {
        return Ok(());
    }
    // (storage, storage_offset, size, stride, ...); the storage is a persistent id
    // ("storage", class, key, location, numel).
    let t = tuple(args, "_rebuild_tensor_v2's arguments", 4)?;
    if let Some(Object::PersistentLoad(id)) = t.first() {
        tuple(id, "the storage's persistent id", 5)?;
    }
    Ok(())
}

/// Reads the tensors of a PyTorch pickle (the zip format of `torch.save` since 1.6: a state dict, possibly under a
/// `state_dict` / `model` / `module` key). Buffers (causal-mask tables and the like, some stored as bool tensors
/// candle cannot represent) are skipped by name without reading their data.
pub fn read_pickle(path: &Path, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    use candle_core::pickle::{Object, Stack};
    use std::io::Read;

    let bad = |msg: String| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: format!("PyTorch pickle: {msg}"),
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        bad(format!(
            "not a torch.save zip archive ({e}); re-save legacy (pre-1.6) pickles with a recent torch.save"
        ))
    })?;
    let pkl = zip
        .file_names()
        .filter_map(|f| f.ok())
        .find(|f| f.ends_with("data.pkl"))
        .map(|f| f.into_owned())
        .ok_or_else(|| bad("no data.pkl in the archive".into()))?;
    let dir = PathBuf::from(pkl.strip_suffix(".pkl").unwrap_or(&pkl));
    let obj = {
        let entry = zip.by_name(&pkl).map_err(|e| bad(format!("{pkl}: {e}")))?;
        // Read whole (it holds names and shapes, not weights; `take` bounds a lying entry size) and checked
        // before candle runs it: candle allocates a string's claimed length before reading it.
        let mut program = Vec::new();
        entry
            .take(file_len.saturating_mul(MAX_DEFLATE_RATIO))
            .read_to_end(&mut program)
            .map_err(|e| bad(format!("{pkl}: {e}")))?;
        check_pickle_lengths(&program).map_err(|e| bad(format!("{pkl}: {e}")))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut program.as_slice())
            .map_err(|e| bad(format!("{pkl}: {e}")))?;
        stack.finalize().map_err(|e| bad(format!("{pkl}: {e}")))?
    };
    let Object::Dict(mut entries) = obj else {
        return Err(bad("the pickle is not a state dict".into()));
    };
    // A checkpoint dict that holds the state dict under a key.
    let nested = entries.iter().position(|(k, v)| {
        matches!(k, Object::Unicode(s) if ["state_dict", "model", "module"].contains(&s.as_str()))
            && matches!(v, Object::Dict(_))
    });
    if let Some(i) = nested {
        if let (_, Object::Dict(inner)) = entries.swap_remove(i) {
            entries = inner;
        }
    }
    let mut out = HashMap::new();
    for (k, v) in entries {
        let Object::Unicode(name) = k else { continue };
        if is_buffer(&name) {
            continue;
        }
        check_tensor_args(&v).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let info = match v.into_tensor_info(Object::Unicode(name.clone()), &dir) {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => return Err(bad(format!("tensor `{name}`: {e}"))),
        };
        let layout = &info.layout;
        let fortran = !layout.is_contiguous() && layout.is_fortran_contiguous();
        if !layout.is_contiguous() && !fortran {
            return Err(bad(format!("tensor `{name}` is not contiguous")));
        }
        let entry = zip
            .by_name(&info.path)
            .map_err(|e| bad(format!("tensor `{name}` ({}): {e}", info.path)))?;
        // The pickle's shape is a claim, not a size: a corrupt or hostile header can promise terabytes. Check it
        // against the bytes the archive really holds before allocating anything of that size.
        let needed = layout
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_add(layout.start_offset()))
            .filter(|&n| n as u64 <= entry.size().min(file_len.saturating_mul(MAX_DEFLATE_RATIO)))
            .ok_or_else(|| {
                bad(format!(
                    "tensor `{name}`: its header promises shape {:?} of {:?} ({} bytes at offset {}), more than \
                     its data entry `{}` holds ({} bytes in a {file_len}-byte file): the file is corrupt or truncated",
                    layout.dims(),
                    info.dtype,
                    layout
                        .dims()
                        .iter()
                        .try_fold(info.dtype.size_in_bytes(), |a, &d| a.checked_mul(d))
                        .map_or("too many".into(), |n| n.to_string()),
                    layout.start_offset(),
                    info.path,
                    entry.size()
                ))
            })?;
        // Read at most what was promised, into a buffer that grows with what actually arrives (the entry's
        // recorded size could lie too).
        let mut buf = Vec::with_capacity(needed.min(file_len as usize));
        entry
            .take(needed as u64)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        if buf.len() != needed {
            return Err(bad(format!(
                "tensor `{name}`: {} bytes of data where its shape needs {needed}: the file is truncated",
                buf.len()
            )));
        }
        let data = &buf[layout.start_offset()..];
        let t = if fortran {
            let rev: Vec<usize> = layout.dims().iter().rev().copied().collect();
            let perm: Vec<usize> = (0..rev.len()).rev().collect();
            Tensor::from_raw_buffer(data, info.dtype, &rev, &Device::Cpu)?
                .permute(perm)?
                .contiguous()?
        } else {
            Tensor::from_raw_buffer(data, info.dtype, layout.dims(), &Device::Cpu)?
        };
        let t = if t.dtype().is_float() && t.dtype() != dtype {
            t.to_dtype(dtype)?
        } else {
            t
        };
        out.insert(name, t.to_device(device)?);
    }
    if out.is_empty() {
        return Err(bad("the state dict holds no tensors".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer (`fuzz_pt_pickle`): a `_rebuild_tensor_v2` call with 4 arguments whose storage id has
    /// only 4 entries made candle's `into_tensor_info` panic ("removal index (is 4) should be < len (is 4)").
    #[test]
    fn short_tensor_argument_tuples_are_refused_not_a_panic() {
        use candle_core::pickle::Object;
        let class = |m: &str, c: &str| Object::Class {
            module_name: m.into(),
            class_name: c.into(),
        };
        let int = Object::Int;
        let rebuild = |args: Vec<Object>| Object::Reduce {
            callable: Box::new(class("torch._utils", "_rebuild_tensor_v2")),
            args: Box::new(Object::Tuple(args)),
        };
        let storage = |n: usize| {
            Object::PersistentLoad(Box::new(Object::Tuple(
                [
                    Object::Unicode("storage".into()),
                    class("torch", "FloatStorage"),
                    Object::Unicode("0".into()),
                    Object::Unicode("cpu".into()),
                    int(4),
                ]
                .into_iter()
                .take(n)
                .collect(),
            )))
        };
        let args = |s: Object| {
            vec![
                s,
                int(0),
                Object::Tuple(vec![int(4)]),
                Object::Tuple(vec![int(1)]),
            ]
        };
        assert_eq!(check_tensor_args(&rebuild(args(storage(5)))), Ok(()));
        let err = check_tensor_args(&rebuild(args(storage(4)))).unwrap_err();
        assert!(err.contains("persistent id has 4 entries"), "{err}");
        let err = check_tensor_args(&rebuild(vec![storage(5), int(0), int(1)])).unwrap_err();
        assert!(err.contains("expected at least 4"), "{err}");
        let from_type = Object::Reduce {
            callable: Box::new(class("torch._tensor", "_rebuild_from_type_v2")),
            args: Box::new(Object::Tuple(vec![int(0), int(1)])),
        };
        assert!(check_tensor_args(&from_type).is_err());
        // Reading goes through the check: candle's own call would have panicked on the short storage id.
        let r = std::panic::catch_unwind(|| {
            rebuild(args(storage(4))).into_tensor_info(Object::Unicode("w".into()), Path::new("d"))
        });
        assert!(
            r.is_err(),
            "candle no longer panics on this input: check_tensor_args may be dropped"
        );
    }

    /// Found by the fuzzer (`fuzz_pt_pickle`): a BINUNICODE length of ~3.6 GB in a 40 KB file made candle allocate
    /// the claimed length before reading, aborting the process.
    #[test]
    fn pickle_string_longer_than_the_program_is_refused_before_allocating() {
        let mut p = vec![0x80, 2, b'}', b'X'];
        p.extend(0xD800_0019u32.to_le_bytes());
        p.extend(b"w.");
        let err = check_pickle_lengths(&p).unwrap_err();
        assert!(
            err.contains("claims 3623878681 bytes") && err.contains("corrupt"),
            "{err}"
        );
        // Well-formed programs pass: a string, a global, ints, a long, and STOP.
        let mut ok = vec![0x80, 2, b'}', b'X', 1, 0, 0, 0, b'w'];
        ok.extend(b"ctorch\nFloatStorage\nK\x05M\x01\x00J\x01\x02\x03\x04\x8a\x02\xff\x01.");
        assert_eq!(check_pickle_lengths(&ok), Ok(()));
        // An integer wider than 64 bits (candle's shift would overflow).
        let mut wide = vec![0x8a, 9];
        wide.extend([1u8; 9]);
        wide.push(b'.');
        assert!(check_pickle_lengths(&wide).unwrap_err().contains("9 bytes"));
        // Truncated arguments are reported, not read past.
        assert!(check_pickle_lengths(&[b'J', 1, 2])
            .unwrap_err()
            .contains("truncated"));
        assert!(check_pickle_lengths(b"ctorch\nFloat")
            .unwrap_err()
            .contains("GLOBAL"));
    }
}
