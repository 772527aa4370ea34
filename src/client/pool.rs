//! Bounded concurrency over plain threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `f` over `items` with at most `concurrency` calls in flight (scoped std threads; `0` counts as 1), and
/// returns the results in input order. Items are handed out one at a time, so a slow item does not hold up the
/// others. A panic in `f` propagates.
pub fn map_concurrent<T: Sync, R: Send>(
    items: &[T],
    concurrency: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let workers = concurrency.max(1).min(items.len());
    if workers <= 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was processed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_order_and_bounds_in_flight() {
        let in_flight = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let items: Vec<u64> = (0..24).collect();
        let out = map_concurrent(&items, 3, |&x| {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2 + (x * 7) % 5));
            in_flight.fetch_sub(1, Ordering::SeqCst);
            x * x
        });
        assert_eq!(out, items.iter().map(|x| x * x).collect::<Vec<_>>());
        let p = peak.load(Ordering::SeqCst);
        assert!((1..=3).contains(&p), "peak {p}");
        assert!(map_concurrent(&[] as &[u8], 4, |x| *x).is_empty());
        assert_eq!(map_concurrent(&[1, 2], 0, |x| x + 1), vec![2, 3]);
    }
}
