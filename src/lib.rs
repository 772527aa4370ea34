//! rrhf: align causal language models with human preferences by ranking responses (Yuan et al. 2023).
//!
//! The crate follows the pipeline: `data` → `sample` → `score` → `train` → `eval`, over a `model` layer.
//!
//! Imports go one way (README "Layout"; `tools/import_graph.py` checks it): the base modules (`alloc`, `rng`,
//! `fsutil`, `device`, `progress`, `plot`, `panic`) import nothing above them; `model` only the base; `data` the base and
//! `model`; `dist` the base and `data`; the stages `sample`, `score`, `train` the base, `model`, `data` (and
//! `client`, `dist`); `eval` also `sample` and `score`; `iterate`, `bench` and the binary everything.

/// Keeps freed tensor buffers in the process heap: glibc otherwise serves every buffer above 128 KiB (growing to
/// 32 MiB) with a fresh `mmap` and returns it on free, so each op pays page faults on new memory (≈25% of a CPU
/// forward on the benchmark). Called once at start-up by the binary.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    tune_threads();
}

/// Runs candle's own element-wise CPU kernels on the calling thread unless `CANDLE_NUM_THREADS` is set.
///
/// candle 0.11 splits each element-wise op over a pool of worker threads that spin (25,000 pauses) after every op
/// before parking, and the caller spins until they finish. Between two element-wise ops come gemm calls on rayon's
/// threads (and the fused ops' own threads), so a spinning pool worker takes a core from them: on SmolLM2-135M
/// (2 cores) perf put 23 % of a training step's samples in those two spin loops against 3 % of element-wise work,
/// and one step took 11.1 s with the pool against 7.6 s without it (same run, a loaded machine). The heavy
/// element-wise chains are fused ops with their own threads (`model::fused_*`).
fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called at start-up, before any thread that reads the environment exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Implements `Serialize` as the `Display` spelling (the CLI value) for option types, so `args.json` holds
/// exactly what a user would type. Defined before the modules so that every one of them can use it.
macro_rules! serialize_as_display {
    ($($t:ty),* $(,)?) => {
        $(impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        })*
    };
}

/// The command-line defaults of a flag group whose flags all have one: what clap fills in for an empty command line,
/// so that a group's `Default` cannot drift from its `#[arg]` attributes.
pub fn cli_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let matches = T::augment_args(clap::Command::new("defaults"))
        .try_get_matches_from(["defaults"])
        .and_then(|m| T::from_arg_matches(&m));
    // Only a group with a required flag fails here: a bug of the caller, found by its first test.
    matches.unwrap_or_else(|e| panic!("cli_defaults: the group has a flag without a default: {e}"))
}

/// `rrhf --version`'s long form: the version and the optional features this binary was built with (`nccl` implies
/// `cuda` and `mpi`).
pub const LONG_VERSION: &str = match (
    cfg!(feature = "cuda"),
    cfg!(feature = "mpi"),
    cfg!(feature = "nccl"),
) {
    (_, _, true) => concat!(env!("CARGO_PKG_VERSION"), " (features: cuda, mpi, nccl)"),
    (true, true, false) => concat!(env!("CARGO_PKG_VERSION"), " (features: cuda, mpi)"),
    (true, false, false) => concat!(env!("CARGO_PKG_VERSION"), " (features: cuda)"),
    (false, true, false) => concat!(env!("CARGO_PKG_VERSION"), " (features: mpi)"),
    (false, false, false) => concat!(env!("CARGO_PKG_VERSION"), " (CPU only)"),
};

pub mod alloc;
pub mod bench;
pub mod client;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod fsutil;
pub mod iterate;
pub mod model;
pub mod panic;
pub mod plot;
pub mod progress;
pub mod rng;
pub mod sample;
pub mod score;
pub mod train;

serialize_as_display!(
    device::DeviceSpec,
    device::DTypeSpec,
    data::batch::Layout,
    data::readers::InputFormat,
    data::readers::PromptTemplate,
    train::loss::SftReduction,
    train::schedule::ScheduleKind,
);
