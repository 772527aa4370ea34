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
