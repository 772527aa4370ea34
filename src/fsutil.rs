//! Crash-safe file output shared by every command: whole files appear atomically, directories are swapped without
//! a moment where neither the old nor the new one exists.
//!
//! It sits below `data`, `model` and `train` (it imports nothing from the crate) so each of them can use it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O error and the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl FsError {
    pub fn new(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FsError {
            path: path.into(),
            source,
        }
    }
}

/// A hidden name beside `path` that no other writer uses: the process id keeps concurrent runs apart, the counter
/// keeps threads (and repeated writes) of one process apart.
pub fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let unique = format!(
        ".{name}.{}.{}.{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    path.with_file_name(unique)
}

/// Writes `bytes` to `path` atomically: see [`write_atomic_with`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically by streaming into a unique temporary file in the same folder, syncing it to disk and
/// renaming it over `path`; on any error the temporary file is removed and `path` is left as it was. Readers see
/// the old file or the complete new one, never a prefix.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), FsError> {
    let tmp = temp_sibling(path, "tmp");
    let written = File::create(&tmp).and_then(|f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        // Named by the file the caller asked for: the temporary name means nothing to a user.
        return Err(FsError::new(path, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(FsError::new(path, e));
    }
    sync_parent(path);
    Ok(())
}

/// Makes `dest` a hard link to `src` (the same bytes on disk, written once), or a copy where the file system has no
/// hard links (or `src` is on another one); atomically, like [`write_atomic`].
pub fn link_or_copy(src: &Path, dest: &Path) -> Result<(), FsError> {
    let tmp = temp_sibling(dest, "tmp");
    if std::fs::hard_link(src, &tmp).is_err() {
        let copied = std::fs::copy(src, &tmp).and_then(|_| File::open(&tmp)?.sync_all());
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::new(dest, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::remove_file(&tmp);
        return Err(FsError::new(dest, e));
    }
    // When `dest` already was a link to `src`, POSIX rename succeeds without doing anything and the temporary
    // link stays behind; remove it (after a real rename it is gone and this fails harmlessly).
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

/// Puts the complete directory `new` at `dest`, replacing what is there without a moment where `dest` is neither
/// the old nor the new directory: the old one is renamed aside, the new one renamed into place, then the old one is
/// removed. A kill between the steps leaves the old directory under a hidden `.NAME.*.old` name, never nothing.
pub fn replace_dir(new: &Path, dest: &Path) -> Result<(), FsError> {
    replace_dir_with_hook(new, dest, |_| Ok(()))
}

/// The steps of [`replace_dir`], each announced to `hook` first so that tests can stop the swap midway (as a kill
/// would) and look at what is on disk.
pub fn replace_dir_with_hook(
    new: &Path,
    dest: &Path,
    mut hook: impl FnMut(ReplaceStep) -> std::io::Result<()>,
) -> Result<(), FsError> {
    let aside = if dest.exists() {
        let aside = temp_sibling(dest, "old");
        hook(ReplaceStep::MoveOldAside).map_err(|e| FsError::new(dest, e))?;
        std::fs::rename(dest, &aside).map_err(|e| FsError::new(dest, e))?;
        Some(aside)
    } else {
        None
    };
    let moved = hook(ReplaceStep::MoveNewIn).and_then(|()| std::fs::rename(new, dest));
    if let Err(e) = moved {
        // Put the old directory back, so a failed swap leaves things as they were.
        if let Some(aside) = &aside {
            let _ = std::fs::rename(aside, dest);
        }
        return Err(FsError::new(dest, e));
    }
    sync_parent(dest);
    if let Some(aside) = aside {
        hook(ReplaceStep::RemoveOld).map_err(|e| FsError::new(&aside, e))?;
        std::fs::remove_dir_all(&aside).map_err(|e| FsError::new(&aside, e))?;
    }
    Ok(())
}

/// A step of [`replace_dir_with_hook`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceStep {
    MoveOldAside,
    MoveNewIn,
    RemoveOld,
}

/// Syncs the folder holding `path`, so a rename survives a power cut; best effort (not every platform or file
/// system lets a directory be opened and synced, and the data itself is already on disk).
fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rrhf-fsutil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let d = scratch("write");
        let p = d.join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(names(&d), vec!["a.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_removes_the_temp() {
        let d = scratch("fail");
        let p = d.join("a.json");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(&d), vec!["a.json"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn link_or_copy_gives_the_same_bytes() {
        let d = scratch("link");
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, b"weights").unwrap();
        std::fs::write(&b, b"stale").unwrap();
        link_or_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"weights");
        assert_eq!(names(&d), vec!["a", "b"]);
        // Linking again over an existing link to the same file leaves no temporary link behind.
        link_or_copy(&a, &b).unwrap();
        assert_eq!(names(&d), vec!["a", "b"]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
