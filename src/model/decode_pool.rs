//! A persistent pool of `threads − 1` workers for the decode kernels: a step runs ~60 small parallel loops, and
//! spawning threads for each would cost more than some of the loops.

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
pub(crate) fn threads() -> usize {
    pool().threads
}

/// Runs `body(0..n)`, spread over the pool and the calling thread; returns when all are done.
pub(crate) fn run<'a>(n: usize, body: &'a (dyn Fn(usize) + Sync + 'a)) {
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
