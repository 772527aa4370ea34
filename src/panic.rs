//! Catching a dependency's panic as an error, quietly.
//!
//! Some dependencies panic on bad input instead of returning an error (the parquet reader on corrupt files, cudarc
//! when a CUDA library is missing). Callers turn such a panic into a clear error; the process-wide panic hook must then
//! neither print the panic nor act on it (under mpirun the hook ends the whole job). Swapping the hook around each
//! call would race with other threads; instead the one hook asks [`catching`], which is per thread.

use std::cell::Cell;
use std::sync::Once;

thread_local! {
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// Whether the current thread is inside [`catch_quietly`]: panic hooks return at once then.
pub fn catching() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

/// Runs `f`; a panic inside it comes back as `Err(message)`, without the panic hook's output or actions.
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !catching() {
                previous(info);
            }
        }));
    });
    CATCHING.with(|c| c.set(c.get() + 1));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    out.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message")
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_is_an_error_with_its_message() {
        assert_eq!(catch_quietly(|| 3), Ok(3));
        let e = catch_quietly(|| -> u8 { panic!("bad page {}", 7) }).unwrap_err();
        assert_eq!(e, "bad page 7");
        assert!(!catching(), "the flag is reset after the panic");
        // Nested catches keep the flag until the outer one ends.
        let inner = catch_quietly(|| {
            let r = catch_quietly(|| -> u8 { panic!("inner") });
            (r, catching())
        })
        .unwrap();
        assert_eq!(inner, (Err("inner".to_string()), true));
        assert!(!catching());
    }
}
