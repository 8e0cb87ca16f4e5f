//! The worker side: [`Worker`] (its session with the primary, `listen`, messaging,
//! stopping) and [`Listener`]. `worker/server_table.rs` is the pure core of the protocol
//! with the primary (handle indexes, listens waiting for their reply, round-robin
//! listeners and their hand-off queues from `worker/handoff_queue.rs`),
//! `worker/session.rs` what the worker's handles share (the table behind one lock, the
//! control queue, the stop state) and the read loop, `worker/listener.rs` the listener,
//! `worker/messages.rs` the bounded queue of user messages, `worker/panic.rs` the hook.

mod handoff_queue;
mod listener;
mod messages;
mod panic;
mod server_table;
mod session;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::listener::Kind;
pub use self::listener::Listener;
use self::messages::UserQueue;
pub use self::messages::{USER_QUEUE_BYTES, USER_QUEUE_CAPACITY};
use self::server_table::QueryAnswer;
use self::session::Session;
use crate::error::{Error, ListenError};
use crate::protocol::{Granted, ToPrimary};
use crate::{Endpoint, WorkerId, net};

/// The backlog a listen asks for unless told otherwise (Node's 511).
pub const DEFAULT_BACKLOG: u32 = 511;

/// Why a worker stops: what [`Worker::stopping`] resolves with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The primary asked (a disconnect, a stop, a reload, a removal).
    Disconnected,
    /// This worker called [`Worker::disconnect`].
    Disconnecting,
    /// A panic in this process started the drain.
    Panicked,
    /// The channel to the primary ended (the primary died or closed it), or the primary
    /// stopped reading it.
    PrimaryGone,
}

/// Options of [`Worker::listen_with`].
#[derive(Debug, Clone)]
pub struct ListenOptions {
    backlog: u32,
    exclusive: bool,
}

impl Default for ListenOptions {
    fn default() -> Self {
        Self {
            backlog: DEFAULT_BACKLOG,
            exclusive: false,
        }
    }
}

impl ListenOptions {
    /// A backlog of 511, shared with the other workers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The listen backlog.
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Binds in this worker instead of asking the primary (Node's `exclusive: true`): the
    /// socket is this worker's alone and dies with it.
    pub fn exclusive(mut self, exclusive: bool) -> Self {
        self.exclusive = exclusive;
        self
    }
}

/// This process's side of the cluster, when it is a worker.
///
/// Get it once with [`Worker::connect`]. It reports the worker online, answers the
/// primary's hand-offs, and installs a panic hook: a panic anywhere in the process tells
/// the primary the worker is going down (so its replacement starts at once) and starts a
/// drain, as if the primary had asked this worker to stop.
///
/// # Stopping
///
/// [`stopping`](Worker::stopping) resolves with a [`StopReason`] when the worker should
/// stop: the primary asked, the worker called [`disconnect`](Worker::disconnect), it
/// panicked, or the primary is gone. From then on listeners yield no more connections;
/// the application should finish its in-flight work and return from `main`. The library
/// never exits the process itself. An application that ignores it is still ended: when the
/// primary process dies, by the parent-death signal (`SIGKILL`); otherwise by the primary
/// when its drain deadline passes.
#[derive(Debug)]
pub struct Worker {
    id: WorkerId,
    slot: Option<usize>,
    session: Arc<Session>,
    messages: Arc<UserQueue>,
}

impl Worker {
    /// Connects to the primary through the channel and id this process was started with,
    /// and reports it online. Call it once, early, within a tokio runtime.
    pub async fn connect() -> Result<Worker, Error> {
        let id = match crate::env::role() {
            crate::env::Role::Worker(id) => id,
            crate::env::Role::Primary => return Err(Error::WrongRole("worker")),
        };
        let channel = child::parent_channel()
            .map_err(|e| Error::Environment(format!("no channel to the primary: {e}")))?
            .ok_or_else(|| Error::Environment("no channel to the primary".into()))?;
        let (mut sender, receiver) = channel.into_split();
        sender.send_control(&ToPrimary::Online, Vec::new()).await?;
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let (control, control_rx) = mpsc::channel(session::CONTROL_QUEUE);
        let session = Arc::new(Session::new(control, Arc::clone(&sender)));
        let messages = Arc::new(UserQueue::default());
        tokio::spawn(session::write_control(sender, control_rx));
        tokio::spawn(session::read_loop(
            receiver,
            Arc::clone(&session),
            Arc::clone(&messages),
        ));
        panic::install(&session);
        Ok(Worker {
            id,
            slot: crate::env::worker_slot(),
            session,
            messages,
        })
    }

    /// This worker's id.
    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// This worker's slot: which of the primary's places it fills (`0..workers` for the
    /// configured ones), the same for its replacements. PM2's `NODE_APP_INSTANCE`.
    pub fn slot(&self) -> Option<usize> {
        self.slot
    }

    /// Listens on `address` the way the primary's policy says, with a backlog of 511.
    /// See [`listen_with`](Worker::listen_with).
    pub async fn listen(&self, address: SocketAddr) -> Result<Listener, ListenError> {
        self.listen_with(address, ListenOptions::new()).await
    }

    /// Listens on `address`. Unless `exclusive`, the primary owns the socket: under
    /// round-robin it accepts and hands connections over, under the shared and reuseport
    /// policies it sends a listening socket. Bind errors come back as typed errors with
    /// Node's meaning, wherever the bind happened.
    ///
    /// Port 0: the first `listen` on `127.0.0.1:0` of every worker shares one port; a
    /// second one in the same worker gets another (Node's handle index). A worker may hold
    /// at most [`MAX_SERVERS_PER_WORKER`](crate::MAX_SERVERS_PER_WORKER) servers.
    ///
    /// Once the worker stops (also when the stop comes while this waits for the primary:
    /// the primary grants no server to a worker it asked to stop, as Node's does), it is
    /// [`ListenError::Stopping`]: nothing to serve, a clean exit.
    pub async fn listen_with(
        &self,
        address: SocketAddr,
        options: ListenOptions,
    ) -> Result<Listener, ListenError> {
        if options.exclusive {
            return self.listen_exclusive(address, options.backlog);
        }
        let (answer, reply) = oneshot::channel();
        let query = self.session.table().query(address, answer);
        let Some((key, seq)) = query else {
            return Err(ListenError::Stopping { address });
        };
        self.session.send_control(ToPrimary::QueryServer {
            seq,
            key: key.clone(),
            backlog: options.backlog,
        });
        let mut pending = PendingAnswer {
            session: &self.session,
            key: &key,
            reply,
        };
        let listening = match (&mut pending.reply).await {
            Ok(answer) => self.granted(key.clone(), address, answer),
            Err(_) if self.session.table().is_stopping() => Err(ListenError::Stopping { address }),
            Err(_) => Err(ListenError::NoReply { address }),
        };
        drop(pending);
        if listening.is_err() {
            self.session.close(&key); // its index is free again
        }
        listening
    }

    /// Binds in this worker (Node's `exclusive: true`).
    fn listen_exclusive(&self, address: SocketAddr, backlog: u32) -> Result<Listener, ListenError> {
        let key = self.session.table().listen_exclusive(address);
        let Some(key) = key else {
            return Err(ListenError::Stopping { address });
        };
        let bound = net::bind_listener(address, backlog, false)
            .and_then(|listener| into_tokio(listener.into()))
            .and_then(|listener| Ok((listener.local_addr()?, listener)));
        match bound {
            Ok((bound, listener)) => Ok(self.announce(key, bound, Kind::Socket(listener), true)),
            Err(e) => {
                self.session.close(&key); // its index is free again
                Err(ListenError::from_io(address, e))
            }
        }
    }

    /// The primary's answer to the listen on `key`, as a listener or the error.
    fn granted(
        &self,
        key: crate::HandleKey,
        address: SocketAddr,
        answer: QueryAnswer,
    ) -> Result<Listener, ListenError> {
        match (answer.result, answer.fd, answer.arrived) {
            (Err(errno), _, _) => Err(ListenError::from_errno(address, errno)),
            (Ok((Granted::RoundRobin, Endpoint::Inet(bound))), _, Some(arrived)) => {
                Ok(self.announce(key, bound, Kind::RoundRobin(arrived), false))
            }
            (Ok((Granted::Socket, _)), Some(fd), _) => {
                let listener = into_tokio(fd).and_then(|l| Ok((l.local_addr()?, l)));
                match listener {
                    Ok((bound, listener)) => {
                        Ok(self.announce(key, bound, Kind::Socket(listener), false))
                    }
                    Err(e) => {
                        // Granted but unusable here: give it back.
                        self.session.send_control(ToPrimary::Close { key });
                        Err(ListenError::from_io(address, e))
                    }
                }
            }
            (Ok((Granted::Socket, _)), None, _) => {
                // Its descriptor was lost on the way (this process is out of them).
                self.session.send_control(ToPrimary::Close { key });
                Err(ListenError::from_errno(address, libc::EMFILE))
            }
            _ => Err(ListenError::NoReply { address }),
        }
    }

    fn announce(
        &self,
        key: crate::HandleKey,
        address: SocketAddr,
        kind: Kind,
        exclusive: bool,
    ) -> Listener {
        self.session.send_control(ToPrimary::Listening {
            key: key.clone(),
            address: address.into(),
            exclusive,
        });
        Listener::new(key, address, kind, Arc::clone(&self.session))
    }

    /// Sends a message to the primary on the user lane (Node's `process.send`).
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), Error> {
        self.session.sender.lock().await.send(message).await?;
        Ok(())
    }

    /// The next message from the primary, `None` once the channel is closed and every
    /// message was read. At most [`USER_QUEUE_CAPACITY`] unread messages and
    /// [`USER_QUEUE_BYTES`] are kept (the newest always): when more arrive, the oldest are
    /// dropped (see [`dropped_messages`](Worker::dropped_messages)),
    /// so a worker that never reads cannot grow, and hand-offs never wait behind them.
    pub async fn recv(&self) -> Option<ipc::Received> {
        self.messages.pop().await
    }

    /// How many user messages were dropped because the queue was full.
    pub fn dropped_messages(&self) -> u64 {
        self.messages.dropped()
    }

    /// Resolves when this worker should stop, with the reason. Listeners yield no more
    /// connections from then on. See [Stopping](Worker#stopping).
    pub async fn stopping(&self) -> StopReason {
        self.session.stop_token().cancelled().await;
        self.session
            .stop_reason()
            .unwrap_or(StopReason::Disconnected)
    }

    /// Why this worker is stopping, if it is.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.session.stop_reason()
    }

    /// Whether this worker was asked to stop.
    pub fn is_stopping(&self) -> bool {
        self.session.stop_token().is_cancelled()
    }

    /// A token cancelled when this worker should stop, to hand to connection tasks.
    pub fn stop_token(&self) -> CancellationToken {
        self.session.stop_token().child_token()
    }

    /// Tells the primary this worker is ready to serve (Node's `process.send('ready')`
    /// under PM2's `wait_ready`). It matters only when the primary waits for it
    /// ([`Settings::wait_ready`](crate::Settings::wait_ready)): until then the worker does
    /// not count as ready, and a rolling reload does not stop the worker it replaces.
    /// Saying it twice is harmless.
    pub fn ready(&self) {
        self.session.send_control(ToPrimary::Ready);
    }

    /// Stops this worker by its own choice (Node's `worker.disconnect()` in a worker):
    /// listeners stop yielding connections (hand-offs not taken go to other workers), the
    /// primary starts a replacement (at once after
    /// [`RestartPolicy::min_uptime`](crate::RestartPolicy::min_uptime), and without counting
    /// a crash; sooner, it counts as one), and the exit has `exited_after_disconnect` set. Finish in-flight work and return from `main`; the
    /// primary kills the process if its drain deadline passes first.
    pub fn disconnect(&self) {
        if self.session.stop_token().is_cancelled() {
            return;
        }
        self.session.send_control(ToPrimary::Disconnecting);
        self.session.stop(StopReason::Disconnecting);
    }

    /// Whether a panic happened in this process since [`connect`](Worker::connect).
    pub fn panicked(&self) -> bool {
        self.session.panicked.load(Ordering::SeqCst)
    }
}

/// A listen waiting for the primary's answer. If the listen is dropped after the answer
/// came but before it was read, the drop gives the server back (frees its index, and
/// returns a grant to the primary); an answer that comes after the drop finds the receiver
/// closed, and the table gives it back (`ServerTable::on_reply`).
struct PendingAnswer<'a> {
    session: &'a Session,
    key: &'a crate::HandleKey,
    reply: oneshot::Receiver<QueryAnswer>,
}

impl Drop for PendingAnswer<'_> {
    fn drop(&mut self) {
        self.reply.close();
        if let Ok(unread) = self.reply.try_recv() {
            self.session.close(self.key);
            if unread.result.is_ok() {
                self.session.send_control(ToPrimary::Close {
                    key: self.key.clone(),
                });
            }
        }
    }
}

fn into_tokio(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_listen_dropped_after_its_answer_came_gives_its_server_back() {
        let (channel, _primary) = ipc::Channel::pair().expect("pair");
        let (sender, _receiver) = channel.into_split();
        let (control, mut to_primary) = mpsc::channel(8);
        let session = Session::new(control, Arc::new(tokio::sync::Mutex::new(sender)));
        let (answer, reply) = oneshot::channel();
        let (key, seq) = session.table().query(addr("127.0.0.1:0"), answer).unwrap();
        let granted = Ok((Granted::RoundRobin, addr("127.0.0.1:5000").into()));
        assert_eq!(
            session.table().on_reply(seq, granted, None),
            None,
            "delivered"
        );
        drop(PendingAnswer {
            session: &session,
            key: &key,
            reply,
        });
        assert!(matches!(to_primary.try_recv(), Ok(ToPrimary::Close { key: k }) if k == key));
        let again = session.table().listen_exclusive(addr("127.0.0.1:0"));
        assert_eq!(again, Some(key), "its index is free again");
    }
}
