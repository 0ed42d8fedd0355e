//! The destination's side of a migration over several connections: the
//! connections of one migration gathered and checked, a reader thread for
//! every connection but the first, and the waits at each round's end and
//! at `done` that keep the connections in step.
//!
//! The source opens connection 0, then the others (`migrate
//! --connections N`); each names, in its handshake hello, the migration
//! it belongs to (16 random bytes the source drew), its index and the
//! count, and key mode binds those into each connection's own Noise
//! handshake. Here connection 0 fixes the migration; a connection of
//! another migration, a repeated index or another count is refused (with
//! an `error` frame saying why) and the wait goes on, until all N have
//! arrived or the time is up.
//!
//! Every connection ends each round with its own `end-of-round` and the
//! stream with its own `done` (which names every connection's frame
//! count); connection 0's receiver acknowledges a round only once every
//! other connection's readers have put that round's pages in memory, and
//! starts the VM only once every connection's `done` agrees. So a page
//! sent in two rounds over two connections lands in round order, and a
//! connection cut at any point fails the migration.
//!
//! This module does not decide what a frame means for the VM
//! (`destination.rs`) or where pages land (`landing.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::address::{Listener, ShutdownHandle, TransportError};
use super::auth::{handshake_as_destination, Authenticated, Security};
use super::landing::{ApplyError, Landing};
use super::protocol::{Frame, FrameStream, Link, ProtocolError, Received};
use super::storage::Copies;
use super::Conn;

/// One connection's frame stream.
pub type Stream = FrameStream<Box<dyn Conn>>;

/// Why the connections of a migration did not come together.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    /// The first connection of a source is not its connection 0.
    #[error("its first connection is connection {index} of {count}; connection 0 must come first")]
    NotFirst {
        /// The index it named.
        index: u32,
        /// The count it named.
        count: u32,
    },
    /// Not every connection arrived in time.
    #[error("only {got} of its {count} connections arrived within {timeout:?}")]
    Missing {
        /// Connections that arrived (connection 0 included).
        got: u32,
        /// Connections the source announced.
        count: u32,
        /// How long they were waited for.
        timeout: Duration,
    },
    /// Accepting failed.
    #[error(transparent)]
    Accept(#[from] TransportError),
}

/// What is wrong with a connection that claims to belong to a migration
/// being received (told to it, then it is closed).
fn stranger(main: &Link, link: &Link, taken: &[bool]) -> Option<String> {
    if link.migration != main.migration {
        return Some(format!(
            "this connection belongs to another migration ({}) than the one being received \
             ({})",
            hex(&link.migration),
            hex(&main.migration)
        ));
    }
    if link.count != main.count {
        return Some(format!(
            "this connection says the migration has {} connections; its connection 0 said {}",
            link.count, main.count
        ));
    }
    if link.index == 0 || taken[link.index as usize] {
        return Some(format!(
            "connection {} of this migration is already here",
            link.index
        ));
    }
    None
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Tells a refused connection why, best effort, and closes it.
fn refuse(auth: Authenticated, why: &str) {
    let mut s = auth.into_frames();
    let _ = s.get_ref().set_write_timeout(Some(Duration::from_secs(1)));
    let _ = s.write_frame(&Frame::Error(why.to_string()));
    let _ = s.flush();
    s.get_ref().shutdown();
}

/// After connection 0 (`main`) authenticated: accepts and authenticates
/// the migration's other connections, waiting at most `timeout` in all;
/// returns them in index order (1, 2, ...). Connections that fail their
/// handshake or belong elsewhere are refused and do not count.
pub fn gather(
    listener: &Listener,
    security: &Security,
    main: &Link,
    handshake_timeout: Duration,
    timeout: Duration,
) -> Result<Vec<Authenticated>, GatherError> {
    if main.index != 0 {
        return Err(GatherError::NotFirst {
            index: main.index,
            count: main.count,
        });
    }
    let count = main.count as usize;
    let mut slots: Vec<Option<Authenticated>> = (0..count).map(|_| None).collect();
    let mut taken = vec![false; count];
    taken[0] = true;
    let mut got = 1;
    let deadline = Instant::now() + timeout;
    while got < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(GatherError::Missing {
                got: got as u32,
                count: main.count,
                timeout,
            });
        }
        let Some(conn) = listener.accept_within(left)? else {
            continue;
        };
        let auth = match handshake_as_destination(conn, security, handshake_timeout.min(left)) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("a connection refused while gathering a migration's: {e}");
                continue;
            }
        };
        let link = auth.binding.link;
        if let Some(why) = stranger(main, &link, &taken) {
            tracing::warn!("a connection refused: {why}");
            refuse(auth, &why);
            continue;
        }
        taken[link.index as usize] = true;
        slots[link.index as usize] = Some(auth);
        got += 1;
    }
    Ok(slots.into_iter().skip(1).flatten().collect())
}

/// What a reader of one connection (1 and up) reports to connection 0's.
#[derive(Debug)]
pub enum LaneEvent {
    /// Everything of this round before it is in guest memory.
    Round {
        /// The connection.
        index: u32,
        /// The round its `end-of-round` named.
        round: u32,
    },
    /// Its `done` arrived (and counted its own frames right).
    Done {
        /// The connection.
        index: u32,
        /// Every connection's frame count, as its `done` says.
        counts: Vec<u64>,
    },
    /// It failed; the migration fails.
    Failed {
        /// The connection.
        index: u32,
        /// Why.
        failure: LaneFailure,
    },
}

/// Why a connection other than 0 failed.
#[derive(Debug, thiserror::Error)]
pub enum LaneFailure {
    /// Its stream broke or carried a bad frame.
    #[error(transparent)]
    Stream(#[from] ProtocolError),
    /// Its pages do not fit the VM.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// A frame only connection 0 carries.
    #[error("a {0} frame, which only connection 0 carries")]
    Unexpected(&'static str),
    /// Disk blocks, which only connection 0 carries.
    #[error("disk blocks at {0:#x}, which only connection 0 carries")]
    DiskBlocks(u64),
    /// The source gave up and said why.
    #[error("the source aborted: {0}")]
    Aborted(String),
}

/// Reads connection `index` until its `done` (or a failure), putting its
/// pages into `landing` and telling `events` of each round's end; counts
/// pages and bytes into `pages` and `bytes` as they come.
pub fn read_lane(
    index: u32,
    mut s: Stream,
    mut landing: Landing<'_>,
    events: &Sender<LaneEvent>,
    pages: &AtomicU64,
    bytes: &AtomicU64,
) {
    let mut seen = s.bytes_read();
    let failure = loop {
        let got = s.read_into(&mut landing);
        let now = s.bytes_read();
        bytes.fetch_add(now - seen, Ordering::Relaxed);
        seen = now;
        let frame = match got {
            Ok(Received::Placed { count, .. }) => {
                pages.fetch_add(u64::from(count), Ordering::Relaxed);
                continue;
            }
            Ok(Received::Frame(f)) => f,
            Err(e) => break LaneFailure::Stream(e),
        };
        let applied = match frame {
            Frame::Pages { gpa, .. } | Frame::Zero { gpa, .. } if Copies::is_disk_address(gpa) => {
                Err(LaneFailure::DiskBlocks(gpa))
            }
            Frame::Pages {
                gpa,
                encoding,
                count,
                data,
            } => {
                let r = landing.decode(gpa, encoding, count, &data);
                s.recycle(data);
                r.map(|()| pages.fetch_add(u64::from(count), Ordering::Relaxed))
                    .map(|_| ())
                    .map_err(LaneFailure::from)
            }
            Frame::Zero { gpa, pages: n } => landing
                .zero(gpa, n)
                .map(|()| {
                    pages.fetch_add(n, Ordering::Relaxed);
                })
                .map_err(LaneFailure::from),
            Frame::EndOfRound { round } => {
                let _ = events.send(LaneEvent::Round { index, round });
                Ok(())
            }
            Frame::Done => {
                let counts = s.done_counts().map(<[u64]>::to_vec).unwrap_or_default();
                let _ = events.send(LaneEvent::Done { index, counts });
                return;
            }
            Frame::Abort(why) => Err(LaneFailure::Aborted(why)),
            f => Err(LaneFailure::Unexpected(f.kind_name())),
        };
        if let Err(e) = applied {
            break e;
        }
    };
    let _ = events.send(LaneEvent::Failed { index, failure });
}

/// Connection 0's view of the others: their events, and a way to cut them.
pub struct Lanes {
    events: Receiver<LaneEvent>,
    count: u32,
    cut: Vec<ShutdownHandle>,
}

/// The other connections did not keep step with connection 0.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// One of them failed.
    #[error("connection {index}: {failure}")]
    Failed {
        /// Which.
        index: u32,
        /// Why.
        #[source]
        failure: LaneFailure,
    },
    /// One said something else than what connection 0 said.
    #[error("connection {index}: {what}")]
    Disagrees {
        /// Which.
        index: u32,
        /// What it said.
        what: String,
    },
    /// They fell silent.
    #[error("connection(s) {missing:?} sent nothing for {timeout:?}")]
    Silent {
        /// The ones still awaited.
        missing: Vec<u32>,
        /// How long they were waited for.
        timeout: Duration,
    },
}

impl Lanes {
    /// Connections 1 to `count - 1`, reporting on `events`; `cut` shuts
    /// each down.
    pub fn new(events: Receiver<LaneEvent>, count: u32, cut: Vec<ShutdownHandle>) -> Lanes {
        Lanes { events, count, cut }
    }

    /// Waits until every other connection has ended round `round`.
    pub fn round_ended(&self, round: u32, timeout: Duration) -> Result<(), StepError> {
        self.wait_each(timeout, |index, ev| match ev {
            LaneEvent::Round { round: r, .. } if r == round => Ok(()),
            LaneEvent::Round { round: r, .. } => Err(StepError::Disagrees {
                index,
                what: format!("it ended round {r} where connection 0 ended round {round}"),
            }),
            LaneEvent::Done { .. } => Err(StepError::Disagrees {
                index,
                what: format!("its stream ended where connection 0 ended round {round}"),
            }),
            LaneEvent::Failed { failure, .. } => Err(StepError::Failed { index, failure }),
        })
    }

    /// Waits until every other connection's `done` arrived, each naming
    /// the same frame counts as connection 0's (`counts`).
    pub fn all_done(&self, counts: &[u64], timeout: Duration) -> Result<(), StepError> {
        self.wait_each(timeout, |index, ev| match ev {
            LaneEvent::Done { counts: c, .. } if c == counts => Ok(()),
            LaneEvent::Done { counts: c, .. } => Err(StepError::Disagrees {
                index,
                what: format!("its done names frame counts {c:?}, connection 0's names {counts:?}"),
            }),
            LaneEvent::Round { round, .. } => Err(StepError::Disagrees {
                index,
                what: format!("it ended round {round} where connection 0's stream ended"),
            }),
            LaneEvent::Failed { failure, .. } => Err(StepError::Failed { index, failure }),
        })
    }

    /// A failure one of them reported, waiting at most `grace` for one
    /// (a connection cut under all of them is often seen first on
    /// connection 0, an instant before the one it was cut on).
    pub fn failure_within(&self, grace: Duration) -> Option<StepError> {
        if self.count < 2 {
            return None;
        }
        let deadline = Instant::now() + grace;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(LaneEvent::Failed { index, failure }) => {
                    return Some(StepError::Failed { index, failure })
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Shuts every other connection down (their readers end).
    pub fn cut(&self) {
        for c in &self.cut {
            c.shutdown();
        }
    }

    /// One event from each other connection, judged by `check`.
    fn wait_each(
        &self,
        timeout: Duration,
        check: impl Fn(u32, LaneEvent) -> Result<(), StepError>,
    ) -> Result<(), StepError> {
        let mut heard = vec![false; self.count as usize];
        heard[0] = true;
        let deadline = Instant::now() + timeout;
        while heard.iter().any(|h| !h) {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match self.events.recv_timeout(left) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(StepError::Silent {
                        missing: (0..self.count).filter(|&i| !heard[i as usize]).collect(),
                        timeout,
                    })
                }
            };
            let index = match &ev {
                LaneEvent::Round { index, .. }
                | LaneEvent::Done { index, .. }
                | LaneEvent::Failed { index, .. } => *index,
            };
            if heard.get(index as usize).copied().unwrap_or(true) {
                if let LaneEvent::Failed { failure, .. } = ev {
                    return Err(StepError::Failed { index, failure });
                }
                return Err(StepError::Disagrees {
                    index,
                    what: "it went on ahead of connection 0".into(),
                });
            }
            heard[index as usize] = true;
            check(index, ev)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_of_another_migration_or_count_or_a_taken_index_are_strangers() {
        let main = Link {
            migration: [1; 16],
            index: 0,
            count: 3,
        };
        let taken = [true, true, false];
        let ok = Link { index: 2, ..main };
        assert_eq!(stranger(&main, &ok, &taken), None);
        let other = Link {
            migration: [2; 16],
            ..ok
        };
        assert!(stranger(&main, &other, &taken)
            .unwrap()
            .contains("another migration"));
        let count = Link { count: 4, ..ok };
        assert!(stranger(&main, &count, &taken)
            .unwrap()
            .contains("has 4 connections"));
        let again = Link { index: 1, ..main };
        assert!(stranger(&main, &again, &taken)
            .unwrap()
            .contains("already here"));
        let zero = Link { index: 0, ..main };
        assert!(stranger(&main, &zero, &taken).is_some());
    }
}
