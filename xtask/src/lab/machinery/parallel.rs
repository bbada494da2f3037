//! Running many independent probes a few at a time.

use std::sync::{
    Mutex,
    atomic::{AtomicUsize, Ordering},
};

use anyhow::Result;

use super::interrupt;

/// `f` applied to every item, `parallel` items at a time; the results come back in the
/// items' order. Fails only on Ctrl-C (checked before each item).
pub(crate) fn map<T: Sync, R: Send>(
    items: &[T],
    parallel: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..parallel.clamp(1, items.len().max(1)))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else {
                            return Ok(());
                        };
                        interrupt::check()?;
                        let result = f(item);
                        done.lock()
                            .expect("no worker panics holding the lock")
                            .push((i, result));
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(())
    })?;
    let mut done = done.into_inner().expect("workers are done");
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn results_keep_the_items_order() {
        let items: Vec<u64> = (0..50).collect();
        let out = super::map(&items, 7, |i| {
            std::thread::sleep(std::time::Duration::from_micros(50 - i));
            i * 2
        })
        .unwrap();
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert!(super::map(&[] as &[u8], 4, |_| ()).unwrap().is_empty());
    }
}
