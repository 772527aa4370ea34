//! Terminal output shared by every stage: the progress line (redrawn in place on a terminal, plain lines
//! otherwise). Imports nothing from the crate, so any stage may use it.

use std::io::IsTerminal;
use std::time::Instant;

/// A progress line: redrawn in place on a terminal, plain lines every `every` steps otherwise.
pub struct Progress {
    total: u64,
    start_step: u64,
    started: Instant,
    tty: bool,
    every: u64,
}

impl Progress {
    /// Progress over `total` steps, starting at `start_step` (resume).
    pub fn new(total: u64, start_step: u64, every: u64) -> Self {
        Self {
            total,
            start_step,
            started: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            every: every.max(1),
        }
    }

    /// Reports step `step` (1-based: steps done) with its loss and throughput.
    pub fn step(&self, step: u64, loss: f64, tokens_per_s: f64) {
        self.report(
            step,
            "step",
            &format!("loss {loss:.4}  {tokens_per_s:.0} tok/s"),
        );
    }

    /// Reports `step` of the total (1-based: steps done) as `"{unit} {step}/{total} [bar] {detail}  ETA …"`.
    pub fn report(&self, step: u64, unit: &str, detail: &str) {
        let done = step - self.start_step;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed / done as f64 * (self.total - step) as f64
        } else {
            0.0
        };
        let bar = {
            let w = 30usize;
            let fill = (w as f64 * step as f64 / self.total.max(1) as f64) as usize;
            format!(
                "[{}{}]",
                "#".repeat(fill.min(w)),
                ".".repeat(w - fill.min(w))
            )
        };
        let line = format!(
            "{unit} {step}/{} {bar} {detail}  ETA {}",
            self.total,
            fmt_secs(eta)
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
            if step == self.total {
                eprintln!();
            }
        } else if step.is_multiple_of(self.every) || step == self.total || done == 1 {
            eprintln!("{line}");
        }
    }

    /// Prints a message on its own line (clearing a drawn progress line).
    pub fn message(&self, msg: &str) {
        if self.tty {
            eprintln!("\r{msg}\x1b[K");
        } else {
            eprintln!("{msg}");
        }
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
