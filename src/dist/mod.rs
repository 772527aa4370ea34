//! Scale-out: this process's rank and world size, and the few collectives that data-parallel training and sharded
//! sampling/scoring need.
//!
//! rrhf rides on the cluster's own launcher rather than a protocol of its own: started by `mpirun` or `srun` (and
//! built with the `mpi` feature) it joins MPI's world; started any other way it is a world of one, where every
//! collective is the identity and costs nothing. The world is process-wide ([`world`]), initialised once by the
//! binary ([`init`]), so that library code asks for it where it needs it instead of threading it through every
//! signature.
//!
//! Every collective runs under a watchdog ([`Comm::set_collective_timeout`]): a rank that waits longer than the
//! timeout for the others (one died, hangs, or lost its network) ends the whole job with an error instead of
//! hanging it forever.
//!
//! Files: mod.rs (Comm, init), backend.rs (the MPI calls, feature `mpi`), grads.rs (gradient all-reduce and
//! digest), nccl.rs (the all-reduce of CUDA gradients on the GPUs, feature `nccl`), shard.rs (sharded
//! sample/score parts and their merge), zero.rs (optimizer-state sharding, `rrhf train --zero-stage 1`).
//!
//! May import: `data` (the records of sharded parts) and the base modules; never a stage.

#[cfg(feature = "mpi")]
mod backend;
mod grads;
#[cfg(feature = "nccl")]
mod nccl;
pub mod shard;
pub mod zero;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use grads::{all_reduce_sum_tensors, grad_digest, NCCL_WORLD_OF_ONE};

/// Why the world could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Launched by a parallel launcher, but this binary cannot talk MPI: every rank would run the whole job alone
    /// and write the same files.
    #[error("rrhf was started by a parallel launcher ({var}={size}) but this binary was built without the `mpi` feature, so every rank would run the whole job on its own; rebuild with `cargo build --release --features mpi` (needs libopenmpi-dev, libclang-dev and clang), or start one process without mpirun/srun")]
    NotBuilt { var: &'static str, size: String },
    /// `MPI_Init_thread` did not succeed (MPI initialised twice, or the launcher's environment is broken).
    #[error("MPI could not be initialised ({var}={size} says a launcher started this process); check that mpirun/srun and the MPI library rrhf was built against are the same installation")]
    Init { var: &'static str, size: String },
    /// A command that has no parallel version was started with more than one rank.
    #[error("`rrhf {command}` does not run in parallel (world size {size}, this is rank {rank}); start it as one process, without mpirun/srun")]
    Unsupported {
        command: String,
        rank: usize,
        size: usize,
    },
    /// The ranks disagree about something that must be the same on all of them.
    #[error("ranks disagree: {0}")]
    Mismatch(String),
}

/// Bytes and seconds spent in collectives since the last [`Comm::take_traffic`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Traffic {
    /// Payload bytes this rank handed to collectives (a ring all-reduce moves 2(N−1)/N of that over each link).
    pub bytes: u64,
    /// Wall-clock seconds spent inside collectives (waiting for slower ranks included).
    pub secs: f64,
}

/// The watchdog's view of the collective in progress.
struct Watch {
    /// Milliseconds since [`epoch`] at which the current collective started; 0 when none is in progress.
    since_ms: AtomicU64,
    /// The timeout in milliseconds; 0: no watchdog.
    timeout_ms: AtomicU64,
    /// What the current collective is, for the message.
    what: Mutex<&'static str>,
    /// The watchdog thread, started with the first timeout.
    started: OnceLock<()>,
}

/// A process's place in the world and its collectives.
pub struct Comm {
    rank: usize,
    size: usize,
    /// Whether MPI carries the collectives (false: a world of one).
    #[cfg(feature = "mpi")]
    mpi: bool,
    bytes: AtomicU64,
    nanos: AtomicU64,
    watch: Watch,
}

static WORLD: OnceLock<Comm> = OnceLock::new();

/// Start of the process's clock for the watchdog.
fn epoch() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// The world this process belongs to: the one [`init`] joined, else a world of one (also inside [`alone`]).
pub fn world() -> &'static Comm {
    if ALONE.with(|a| a.get()) {
        static ONE: OnceLock<Comm> = OnceLock::new();
        return ONE.get_or_init(|| Comm::new(0, 1, false));
    }
    WORLD.get_or_init(|| Comm::new(0, 1, false))
}

thread_local! {
    static ALONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as a world of one on this thread: what it calls shards nothing and waits for no other rank (how rank 0
/// runs a stage that has no parallel version while the others wait).
pub fn alone<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            ALONE.with(|a| a.set(self.0));
        }
    }
    let _reset = Reset(ALONE.with(|a| a.replace(true)));
    f()
}

/// Keeps MPI initialised while alive and finalises it when dropped (hold it in `main` for the whole run).
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<::mpi::environment::Universe>,
}

/// The launcher variable that gives the world size, and its value, when a parallel launcher started this
/// process: Open MPI's `mpirun`, MPICH/Hydra or Slurm's `srun` (PMI-1/2), or PMIx.
pub fn launcher() -> Option<(&'static str, String)> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "PMIX_RANK"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().map(|s| (v, s)))
}

/// Joins MPI's world when a launcher started this process (and the `mpi` feature is built), else the world of one.
/// Call once, first thing in `main`.
pub fn init() -> Result<Guard, DistError> {
    let Some((var, size)) = launcher() else {
        return Ok(Guard {
            #[cfg(feature = "mpi")]
            _universe: None,
        });
    };
    #[cfg(feature = "mpi")]
    {
        share_cores();
        let (universe, rank, n) = backend::init().ok_or(DistError::Init { var, size })?;
        let _ = WORLD.set(Comm::new(rank, n, true));
        if n > 1 {
            install_panic_abort();
        }
        Ok(Guard {
            _universe: Some(universe),
        })
    }
    #[cfg(not(feature = "mpi"))]
    {
        // `mpirun -np 1` (or a lone PMIx process) is a world of one either way.
        if var == "PMIX_RANK" || size.trim() == "1" {
            return Ok(Guard {});
        }
        Err(DistError::NotBuilt { var, size })
    }
}

/// Ranks on one machine share its cores: unless `RAYON_NUM_THREADS` says otherwise, each rank's thread pool takes
/// its share of them, since N ranks each starting a thread per core oversubscribe the machine N-fold. Runs before
/// MPI (and any other thread) starts.
#[cfg(feature = "mpi")]
fn share_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PMIX_LOCAL_SIZE",
    ]
    .into_iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok());
    if let Some(local) = local.filter(|&n| n > 1) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", (cores / local).max(1).to_string());
    }
}

/// A panicking rank ends the job (its message first) instead of leaving the others waiting in a collective.
#[cfg(feature = "mpi")]
fn install_panic_abort() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // A dependency's panic that its caller turns into an error is no reason to end the job.
        if crate::panic::catching() {
            return;
        }
        default(info);
        world().abort(101);
    }));
}

impl Comm {
    fn new(rank: usize, size: usize, mpi: bool) -> Self {
        #[cfg(not(feature = "mpi"))]
        let _ = mpi;
        Comm {
            rank,
            size,
            #[cfg(feature = "mpi")]
            mpi,
            bytes: AtomicU64::new(0),
            nanos: AtomicU64::new(0),
            watch: Watch {
                since_ms: AtomicU64::new(0),
                timeout_ms: AtomicU64::new(0),
                what: Mutex::new(""),
                started: OnceLock::new(),
            },
        }
    }

    /// This process's rank, 0-based.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this rank writes the job's shared outputs (checkpoints, metrics, merged files): rank 0.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Whether there is more than one rank.
    pub fn is_parallel(&self) -> bool {
        self.size > 1
    }

    /// Ends the job on every rank with exit code `code` (MPI_Abort); a world of one just exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if self.mpi {
            backend::abort(code);
        }
        std::process::exit(code)
    }

    /// Arms the watchdog: a collective that has not finished after `timeout` ends the job (None: disarmed).
    pub fn set_collective_timeout(&'static self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| (t.as_millis() as u64).max(1));
        self.watch.timeout_ms.store(ms, Ordering::SeqCst);
        if ms == 0 || !self.is_parallel() {
            return;
        }
        self.watch.started.get_or_init(|| {
            std::thread::Builder::new()
                .name("rrhf-watchdog".into())
                .spawn(move || self.watchdog())
                .map(|_| ())
                .unwrap_or_else(|e| {
                    eprintln!("rrhf: rank {}: no collective watchdog ({e})", self.rank)
                });
        });
    }

    /// The watchdog thread: polls the collective in progress and aborts the job once it overran the timeout.
    fn watchdog(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let since = self.watch.since_ms.load(Ordering::SeqCst);
            let timeout = self.watch.timeout_ms.load(Ordering::SeqCst);
            if since == 0 || timeout == 0 {
                continue;
            }
            let now = epoch().elapsed().as_millis() as u64 + 1;
            if now.saturating_sub(since) > timeout {
                let what = *self.watch.what.lock().unwrap_or_else(|e| e.into_inner());
                eprintln!(
                    "error: rank {} of {}: {what} did not finish within --collective-timeout-s {:.0}: another rank \
                     died, hangs or fell behind; ending the job on every rank. If a step can legitimately take \
                     longer (a slow checkpoint save on rank 0), raise --collective-timeout-s",
                    self.rank,
                    self.size,
                    timeout as f64 / 1000.0
                );
                self.abort(3);
            }
        }
    }

    /// Runs collective `f` under the watchdog, counting its bytes and time.
    fn collective<T>(&self, what: &'static str, bytes: usize, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        *self.watch.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
        self.watch
            .since_ms
            .store(epoch().elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
        let out = f();
        self.watch.since_ms.store(0, Ordering::SeqCst);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Bytes and seconds spent in collectives since the previous call.
    pub fn take_traffic(&self) -> Traffic {
        Traffic {
            bytes: self.bytes.swap(0, Ordering::Relaxed),
            secs: self.nanos.swap(0, Ordering::Relaxed) as f64 * 1e-9,
        }
    }

    /// Replaces `buf` on every rank by the element-wise sum of all ranks' `buf` (same length on every rank).
    pub fn all_reduce_sum_f32(&self, what: &'static str, buf: &mut [f32]) {
        if !self.is_parallel() {
            return;
        }
        self.collective(what, std::mem::size_of_val(buf), || {
            #[cfg(feature = "mpi")]
            backend::all_reduce_sum_f32(buf);
        })
    }

    /// Every rank's `local` (same length on every rank), concatenated in rank order.
    pub fn all_gather_f64(&self, what: &'static str, local: &[f64]) -> Vec<f64> {
        if !self.is_parallel() {
            return local.to_vec();
        }
        self.collective(what, std::mem::size_of_val(local), || {
            #[cfg(feature = "mpi")]
            return backend::all_gather_f64(local, self.size);
            #[cfg(not(feature = "mpi"))]
            local.to_vec()
        })
    }

    /// Replaces each of `vals` by its sum over all ranks, added in rank order (the same on every rank).
    pub fn sum_f64(&self, what: &'static str, vals: &mut [f64]) {
        if !self.is_parallel() || vals.is_empty() {
            return;
        }
        let all = self.all_gather_f64(what, vals);
        vals.fill(0.0);
        for part in all.chunks(vals.len()) {
            for (v, x) in vals.iter_mut().zip(part) {
                *v += x;
            }
        }
    }

    /// Rank `root`'s `bytes` on every rank (any length; the other ranks' contents are replaced).
    // A Vec, not a slice: the MPI build resizes it to the root's length.
    #[cfg_attr(not(feature = "mpi"), allow(clippy::ptr_arg))]
    pub fn broadcast_bytes(&self, what: &'static str, root: usize, bytes: &mut Vec<u8>) {
        if !self.is_parallel() {
            return;
        }
        let n = bytes.len();
        self.collective(what, n, || {
            #[cfg(feature = "mpi")]
            backend::broadcast_bytes(root, bytes);
            #[cfg(not(feature = "mpi"))]
            let _ = root;
        })
    }

    /// Every rank's `mine`, in rank order, on every rank (one broadcast per rank).
    pub fn all_gather_bytes(&self, what: &'static str, mine: &[u8]) -> Vec<Vec<u8>> {
        (0..self.size)
            .map(|r| {
                let mut buf = if r == self.rank {
                    mine.to_vec()
                } else {
                    Vec::new()
                };
                self.broadcast_bytes(what, r, &mut buf);
                buf
            })
            .collect()
    }

    /// Waits until every rank has arrived.
    pub fn barrier(&self, what: &'static str) {
        if !self.is_parallel() {
            return;
        }
        self.collective(what, 0, || {
            #[cfg(feature = "mpi")]
            backend::barrier();
        })
    }

    /// Checks that `value` is the same on every rank, else names the first rank whose value differs from rank 0's.
    pub fn check_same(&self, what: &'static str, value: &str) -> Result<(), DistError> {
        if !self.is_parallel() {
            return Ok(());
        }
        let mut root = value.as_bytes().to_vec();
        self.broadcast_bytes(what, 0, &mut root);
        let differs = f64::from(u8::from(root != value.as_bytes()));
        let flags = self.all_gather_f64(what, &[differs]);
        match flags.iter().position(|&d| d != 0.0) {
            None => Ok(()),
            Some(r) => Err(DistError::Mismatch(format!(
                "{what} differs between rank 0 and rank {r} (this is rank {}: `{value}`; rank 0: `{}`); every rank \
                 must see the same files and flags (a shared file system for --data, --model and --output)",
                self.rank,
                String::from_utf8_lossy(&root)
            ))),
        }
    }

    /// Refuses a command without a parallel version when there is more than one rank.
    pub fn require_single(&self, command: &str) -> Result<(), DistError> {
        if self.is_parallel() {
            return Err(DistError::Unsupported {
                command: command.into(),
                rank: self.rank,
                size: self.size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_is_a_world_of_one_and_restores_the_world() {
        let outer = world() as *const Comm;
        let inner = alone(|| {
            assert!(!world().is_parallel() && world().is_root());
            // Nested: still alone, and the outer `alone` still ends it.
            alone(|| assert_eq!(world().size(), 1));
            world() as *const Comm
        });
        assert_eq!(world() as *const Comm, outer);
        assert_ne!(inner, outer);
    }

    #[test]
    fn a_world_of_one_is_the_identity() {
        let c = Comm::new(0, 1, false);
        let mut buf = [1.0f32, -2.5];
        c.all_reduce_sum_f32("test", &mut buf);
        assert_eq!(buf, [1.0, -2.5]);
        assert_eq!(c.all_gather_f64("test", &[3.0]), vec![3.0]);
        assert!(c.check_same("test", "x").is_ok());
        assert!(c.require_single("iterate").is_ok());
        assert_eq!(c.take_traffic(), Traffic::default());
        assert!(c.is_root() && !c.is_parallel());
    }
}
