//! Preparing window N+1 while window N is written, with the writing on its own thread.
//!
//! One-pass writers (export, qcow2 export) decode a window on all cores and write the one
//! before it meanwhile. The write blocks in the kernel (an `O_DIRECT` write waits for the
//! disk); run inside rayon's pool, as `rayon::join` did, it held one of the two workers
//! while it blocked and the decoding ran on one core. Here the writing has a thread of its
//! own outside the pool (docs/PERFORMANCE.md, "Writes off rayon's pool").

use std::thread::{Scope, ScopedJoinHandle};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::Result;

/// A thread that writes the items handed to it, in order, one at a time. `write` may hand
/// an item's buffers back (`Some`) for [`WriteBehind::spare`] to give out again.
pub struct WriteBehind<'scope, T> {
    /// Up to `ahead` items wait here while one is written and the next prepared.
    items: Sender<T>,
    spares: Receiver<T>,
    writer: ScopedJoinHandle<'scope, Result<()>>,
}

impl<'scope, T: Send + 'scope> WriteBehind<'scope, T> {
    /// Starts the writing thread in `scope`; `ahead` items may wait for it (0: a hand-over).
    pub fn spawn<'env>(
        scope: &'scope Scope<'scope, 'env>,
        ahead: usize,
        mut write: impl FnMut(T) -> Result<Option<T>> + Send + 'scope,
    ) -> Self {
        let (items, queue) = bounded::<T>(ahead);
        let (spare_tx, spares) = bounded::<T>(ahead + 2);
        let writer = scope.spawn(move || -> Result<()> {
            for item in queue {
                if let Some(spare) = write(item)? {
                    let _ = spare_tx.try_send(spare);
                }
            }
            Ok(())
        });
        WriteBehind {
            items,
            spares,
            writer,
        }
    }

    /// Buffers a written item handed back, if one is free.
    pub fn spare(&self) -> Option<T> {
        self.spares.try_recv().ok()
    }

    /// Hands `item` to the writer once it has written the previous one. `false` when the
    /// writer stopped on an error ([`WriteBehind::finish`] returns it): stop preparing.
    pub fn send(&self, item: T) -> bool {
        self.items.send(item).is_ok()
    }

    /// Waits for the last item to be written; the writer's first error, if any. A panic on
    /// the writing thread is resumed here.
    pub fn finish(self) -> Result<()> {
        drop(self.items);
        match self.writer.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Runs `prepare` on each of `inputs` in order on the calling thread (it may use rayon's
/// pool), and `write` on each prepared item in the same order on a [`WriteBehind`] thread,
/// one item behind, or up to `ahead` more when the writing falls behind (a writer that waits
/// for a disk whose pace varies). `write` may hand back the item's buffers (`Some`) for the
/// next `prepare` to reuse (it gets `Some` when one is free), so a pass allocates `ahead + 2`
/// (rarely one more). The first error stops both sides and is returned (a write error
/// first: it concerns an earlier window).
pub fn prepare_while_writing<In, T: Send>(
    inputs: impl IntoIterator<Item = In>,
    ahead: usize,
    mut prepare: impl FnMut(In, Option<T>) -> Result<T>,
    write: impl FnMut(T) -> Result<Option<T>> + Send,
) -> Result<()> {
    std::thread::scope(|s| {
        let behind = WriteBehind::spawn(s, ahead, write);
        let mut prepared = Ok(());
        for input in inputs {
            match prepare(input, behind.spare()) {
                Ok(item) => {
                    if !behind.send(item) {
                        break; // the writer stopped on an error, returned below
                    }
                }
                Err(e) => {
                    prepared = Err(e);
                    break;
                }
            }
        }
        behind.finish().and(prepared)
    })
}

#[cfg(test)]
mod tests {
    use super::prepare_while_writing;
    use crate::error::Error;
    use std::sync::Mutex;

    #[test]
    fn writes_every_item_in_order_and_reuses_buffers() {
        for ahead in [0, 2] {
            let written = Mutex::new(Vec::new());
            let mut fresh = 0;
            prepare_while_writing(
                0..100u32,
                ahead,
                |i, spare: Option<Vec<u32>>| {
                    let mut buf = spare.unwrap_or_else(|| {
                        fresh += 1;
                        Vec::new()
                    });
                    buf.clear();
                    buf.push(i);
                    Ok(buf)
                },
                |buf| {
                    written.lock().unwrap().extend_from_slice(&buf);
                    Ok(Some(buf))
                },
            )
            .unwrap();
            assert_eq!(*written.lock().unwrap(), (0..100).collect::<Vec<_>>());
            assert!(
                fresh <= ahead + 3,
                "{fresh} buffers allocated, {ahead} ahead"
            );
        }
    }

    #[test]
    fn a_write_error_stops_the_pass_and_is_returned() {
        let mut prepared = 0;
        let err = prepare_while_writing(
            0..1000u32,
            2,
            |i, _| {
                prepared += 1;
                Ok(i)
            },
            |i| {
                if i == 5 {
                    Err(Error::invalid("write", "disk full at window 5"))
                } else {
                    Ok(None)
                }
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("window 5"), "{err}");
        assert!(prepared < 1000, "preparing went on after the write failed");
    }

    #[test]
    fn a_prepare_error_is_returned_after_the_earlier_items_are_written() {
        let written = Mutex::new(Vec::new());
        let err = prepare_while_writing(
            0..10u32,
            2,
            |i, _| {
                if i == 3 {
                    Err(Error::invalid("decode", "chunk at window 3 is damaged"))
                } else {
                    Ok(i)
                }
            },
            |i| {
                written.lock().unwrap().push(i);
                Ok(None)
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("window 3"), "{err}");
        assert_eq!(*written.lock().unwrap(), vec![0, 1, 2]);
    }
}
