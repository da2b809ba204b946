//! The one pipeline shape bmr's bulk work uses: a feeder thread, N workers with their own
//! state (buffers, a compressor), and the calling thread collecting results, over bounded
//! queues so memory stays fixed whatever the disk size. The first error anywhere stops the
//! feeding, the rest of the queue is drained unprocessed, and that error is returned.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use crossbeam_channel::{Receiver, Sender, bounded};

/// Default worker count: twice the CPUs, since workers also wait on I/O.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

/// The feeding side of a pipeline.
pub struct Feeder<'a, T> {
    tx: Sender<T>,
    stop: &'a AtomicBool,
}

impl<T> Feeder<'_, T> {
    /// Queue an item; false once the pipeline has stopped: feed no more.
    pub fn send(&self, item: T) -> bool {
        !self.stopped() && self.tx.send(item).is_ok()
    }

    /// Whether an error elsewhere has stopped the pipeline.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// What every thread of a pipeline shares: the stop flag and the first error.
#[derive(Default)]
struct First {
    stop: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
}

impl First {
    fn into_result(self) -> Result<()> {
        match self.error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fail(&self, e: anyhow::Error) {
        self.stop.store(true, Ordering::Relaxed);
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }
}

/// One worker: its state, then items until the queue closes; after an error anywhere the rest
/// of the queue is drained unprocessed, so the feeder is never left blocked.
fn worker<T, R, S>(
    first: &First,
    init: &(impl Fn() -> Result<S> + Sync),
    work: &(impl Fn(&mut S, T) -> Result<R> + Sync),
    rx: &Receiver<T>,
    mut out: impl FnMut(R),
) {
    let mut state = match init() {
        Ok(st) => Some(st),
        Err(e) => {
            first.fail(e);
            None
        }
    };
    for item in rx.iter() {
        let Some(st) = state.as_mut() else { continue };
        if first.stop.load(Ordering::Relaxed) {
            continue;
        }
        match work(st, item) {
            Ok(r) => out(r),
            Err(e) => first.fail(e),
        }
    }
}

/// Run `feed` on its own thread, `work` on `threads` workers (each with the state `init`
/// makes), and `collect` on the calling thread, in completion order.
pub fn pipeline<T, R, S>(
    threads: usize,
    init: impl Fn() -> Result<S> + Sync,
    work: impl Fn(&mut S, T) -> Result<R> + Sync,
    feed: impl FnOnce(&Feeder<T>) -> Result<()> + Send,
    mut collect: impl FnMut(R) -> Result<()>,
) -> Result<()>
where
    T: Send,
    R: Send,
{
    let (threads, first) = (threads.max(1), First::default());
    let (tx, rx) = bounded::<T>(threads * 2);
    let (rtx, rrx) = bounded::<R>(threads * 2);
    std::thread::scope(|s| {
        let (first, init, work) = (&first, &init, &work);
        s.spawn(move || {
            let f = Feeder {
                tx,
                stop: &first.stop,
            };
            if let Err(e) = feed(&f) {
                first.fail(e);
            }
        });
        for _ in 0..threads {
            let (rx, rtx) = (rx.clone(), rtx.clone());
            s.spawn(move || {
                worker(first, init, work, &rx, |r| {
                    let _ = rtx.send(r);
                })
            });
        }
        drop((rx, rtx));
        for r in rrx.iter() {
            if first.stop.load(Ordering::Relaxed) {
                continue;
            }
            if let Err(e) = collect(r) {
                first.fail(e);
            }
        }
    });
    first.into_result()
}

/// A pipeline whose workers return nothing to collect: the calling thread feeds.
pub fn for_each<T: Send, S>(
    threads: usize,
    init: impl Fn() -> Result<S> + Sync,
    work: impl Fn(&mut S, T) -> Result<()> + Sync,
    feed: impl FnOnce(&Feeder<T>) -> Result<()>,
) -> Result<()> {
    let (threads, first) = (threads.max(1), First::default());
    let (tx, rx) = bounded::<T>(threads * 2);
    std::thread::scope(|s| {
        let (first, init, work) = (&first, &init, &work);
        for _ in 0..threads {
            let rx = rx.clone();
            s.spawn(move || worker(first, init, work, &rx, |()| {}));
        }
        drop(rx);
        let f = Feeder {
            tx,
            stop: &first.stop,
        };
        if let Err(e) = feed(&f) {
            first.fail(e);
        }
        // Closing the queue ends the workers.
        drop(f);
    });
    first.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_items_pass_and_the_first_error_stops_the_rest() {
        let mut sum = 0u64;
        pipeline(
            3,
            || Ok(0u64),
            |seen, x: u64| {
                *seen += 1;
                Ok(x * 2)
            },
            |f| {
                for i in 0..1000 {
                    assert!(f.send(i));
                }
                Ok(())
            },
            |r| {
                sum += r;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(sum, 999 * 1000);

        let fed = std::sync::atomic::AtomicU64::new(0);
        let e = for_each(
            2,
            || Ok(()),
            |_, x: u64| {
                if x == 10 {
                    anyhow::bail!("item {x} is bad")
                }
                Ok(())
            },
            |f| {
                for i in 0..1_000_000 {
                    if !f.send(i) {
                        break;
                    }
                    fed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "item 10 is bad");
        assert!(fed.load(Ordering::Relaxed) < 1_000_000);
    }
}
