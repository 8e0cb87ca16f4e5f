//! The worker side: the channel to the primary, `listen`, accepting, draining, messaging
//! and the panic hook.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ListenError};
use crate::protocol::{AddressFamily, Granted, HandleKey, ToPrimary, ToWorker};
use crate::{WorkerId, net};

/// The backlog a listen asks for unless told otherwise (Node's 511).
pub const DEFAULT_BACKLOG: u32 = 511;

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

/// The round-robin hand-offs waiting for one listener's `accept`.
#[derive(Debug)]
struct HandoffQueue {
    key: HandleKey,
    items: Mutex<VecDeque<(u64, OwnedFd)>>,
    notify: Notify,
    refusing: AtomicBool,
    closed: AtomicBool,
}

#[derive(Debug)]
struct QueryAnswer {
    result: Result<(Granted, SocketAddr), i32>,
    fd: Option<OwnedFd>,
    queue: Option<Arc<HandoffQueue>>,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    queries: HashMap<u64, (HandleKey, oneshot::Sender<QueryAnswer>)>,
    queues: HashMap<HandleKey, Arc<HandoffQueue>>,
    indexes: HashMap<(String, u16, AddressFamily), u32>,
}

#[derive(Debug)]
struct Inner {
    control: mpsc::UnboundedSender<ToPrimary>,
    sender: Arc<tokio::sync::Mutex<ipc::Sender>>,
    stop: CancellationToken,
    panicked: AtomicBool,
    state: Mutex<State>,
}

impl Inner {
    fn send_control(&self, message: ToPrimary) {
        // Fails only when the writer is gone, i.e. the channel is closed and we exit.
        let _ = self.control.send(message);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses every hand-off not yet accepted, and any later one.
    fn refuse_pending(&self) {
        let queues: Vec<_> = self.state().queues.values().cloned().collect();
        for queue in queues {
            queue.closed.store(true, Ordering::SeqCst);
            self.refuse_queue(&queue);
        }
    }

    fn refuse_queue(&self, queue: &HandoffQueue) {
        let items: Vec<_> = queue
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for (seq, _fd) in items {
            self.send_control(ToPrimary::Accepted {
                key: queue.key.clone(),
                seq,
                accepted: false,
            });
        }
    }
}

/// This process's side of the cluster, when it is a worker.
///
/// Get it once with [`Worker::connect`]. It reports the worker online, answers the
/// primary's hand-offs, and installs a panic hook: a panic anywhere in the process tells
/// the primary the worker is going down (so its replacement starts at once) and starts a
/// drain, as if the primary had asked this worker to stop.
///
/// # Exiting
///
/// When the channel to the primary closes (the primary died), the process exits with
/// code 0 at once, like a Node worker. When the primary asks it to stop,
/// [`stopping`](Worker::stopping) resolves, listeners stop yielding connections, and the
/// application should finish its in-flight work and return from `main`; the primary
/// kills it when its drain deadline passes.
#[derive(Debug)]
pub struct Worker {
    id: WorkerId,
    inner: Arc<Inner>,
    messages: tokio::sync::Mutex<mpsc::UnboundedReceiver<ipc::Received>>,
}

impl Worker {
    /// Connects to the primary through the channel and id this process was started with,
    /// and reports it online. Call it once, early, within a tokio runtime.
    pub async fn connect() -> Result<Worker, Error> {
        let id = match crate::role() {
            crate::Role::Worker(id) => id,
            crate::Role::Primary => return Err(Error::WrongRole("worker")),
        };
        let channel = child::parent_channel()
            .map_err(|e| Error::Environment(format!("no channel to the primary: {e}")))?
            .ok_or_else(|| Error::Environment("no channel to the primary".into()))?;
        let (mut sender, receiver) = channel.into_split();
        sender.send_control(&ToPrimary::Online, Vec::new()).await?;
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let (control, control_rx) = mpsc::unbounded_channel();
        let (messages_tx, messages) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            control,
            sender: Arc::clone(&sender),
            stop: CancellationToken::new(),
            panicked: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        });
        tokio::spawn(write_control(sender, control_rx));
        tokio::spawn(read_loop(receiver, Arc::clone(&inner), messages_tx));
        install_panic_hook(&inner);
        Ok(Worker {
            id,
            inner,
            messages: tokio::sync::Mutex::new(messages),
        })
    }

    /// This worker's id.
    pub fn id(&self) -> WorkerId {
        self.id
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
    /// second one in the same worker gets another (Node's handle index).
    pub async fn listen_with(
        &self,
        address: SocketAddr,
        options: ListenOptions,
    ) -> Result<Listener, ListenError> {
        if self.inner.stop.is_cancelled() {
            return Err(ListenError::Stopping { address });
        }
        let family = AddressFamily::of(&address);
        let (key, seq, reply) = {
            let mut state = self.inner.state();
            let index = state
                .indexes
                .entry((address.ip().to_string(), address.port(), family))
                .or_insert(0);
            let key = HandleKey {
                address: address.ip().to_string(),
                port: address.port(),
                family,
                fd: None,
                index: *index,
            };
            *index += 1;
            let seq = state.next_seq;
            state.next_seq += 1;
            let (tx, rx) = oneshot::channel();
            if !options.exclusive {
                state.queries.insert(seq, (key.clone(), tx));
            }
            (key, seq, rx)
        };
        let kind = if options.exclusive {
            let listener = net::bind_listener(address, options.backlog, false)
                .map_err(|e| ListenError::from_io(address, e))?;
            Kind::Socket(into_tokio(listener.into()).map_err(|e| ListenError::from_io(address, e))?)
        } else {
            self.inner.send_control(ToPrimary::QueryServer {
                seq,
                key: key.clone(),
                backlog: options.backlog,
            });
            let answer = reply.await.map_err(|_| ListenError::NoReply { address })?;
            match (answer.result, answer.fd, answer.queue) {
                (Err(errno), _, _) => return Err(ListenError::from_errno(address, errno)),
                (Ok((Granted::RoundRobin, bound)), _, Some(queue)) => {
                    return Ok(self.announce(key, bound, Kind::RoundRobin(queue)));
                }
                (Ok((Granted::Socket, _)), Some(fd), _) => {
                    Kind::Socket(into_tokio(fd).map_err(|e| ListenError::from_io(address, e))?)
                }
                _ => return Err(ListenError::NoReply { address }),
            }
        };
        let Kind::Socket(listener) = &kind else {
            unreachable!("round-robin returned above")
        };
        let bound = listener
            .local_addr()
            .map_err(|e| ListenError::from_io(address, e))?;
        Ok(self.announce(key, bound, kind))
    }

    fn announce(&self, key: HandleKey, address: SocketAddr, kind: Kind) -> Listener {
        self.inner.send_control(ToPrimary::Listening {
            key: key.clone(),
            address,
        });
        Listener {
            key,
            address,
            kind: Some(kind),
            inner: Arc::clone(&self.inner),
        }
    }

    /// Sends a message to the primary on the user lane (Node's `process.send`).
    pub async fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), Error> {
        self.inner.sender.lock().await.send(message).await?;
        Ok(())
    }

    /// The next message from the primary, `None` once the channel is closed. Messages
    /// queue in memory until read.
    pub async fn recv(&self) -> Option<ipc::Received> {
        self.messages.lock().await.recv().await
    }

    /// Resolves when this worker should stop: the primary disconnected it, or a panic
    /// started a drain. Listeners yield no more connections from then on.
    pub async fn stopping(&self) {
        self.inner.stop.cancelled().await;
    }

    /// Whether this worker was asked to stop.
    pub fn is_stopping(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// A token cancelled when this worker should stop, to hand to connection tasks.
    pub fn stop_token(&self) -> CancellationToken {
        self.inner.stop.child_token()
    }

    /// Whether a panic happened in this process since [`connect`](Worker::connect).
    pub fn panicked(&self) -> bool {
        self.inner.panicked.load(Ordering::SeqCst)
    }
}

fn into_tokio(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

#[derive(Debug)]
enum Kind {
    RoundRobin(Arc<HandoffQueue>),
    Socket(TcpListener),
}

/// A listening server in a worker: yields accepted connections whatever the policy.
#[derive(Debug)]
pub struct Listener {
    key: HandleKey,
    address: SocketAddr,
    kind: Option<Kind>,
    inner: Arc<Inner>,
}

impl Listener {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The primary's key for this listener's handle.
    pub fn key(&self) -> &HandleKey {
        &self.key
    }

    /// The next connection, or `Ok(None)` once the worker is stopping (and forever after).
    /// Under round-robin, taking a connection is what tells the primary it was accepted;
    /// connections not taken before the worker stops are handed to another worker.
    pub async fn accept(&mut self) -> io::Result<Option<TcpStream>> {
        loop {
            let stop = self.inner.stop.clone();
            if stop.is_cancelled() {
                self.close();
                return Ok(None);
            }
            match &self.kind {
                None => return Ok(None),
                Some(Kind::Socket(listener)) => {
                    tokio::select! {
                        accepted = listener.accept() => return accepted.map(|(s, _)| Some(s)),
                        () = stop.cancelled() => {}
                    }
                }
                Some(Kind::RoundRobin(queue)) => {
                    let item = queue
                        .items
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .pop_front();
                    if let Some((seq, fd)) = item {
                        let stream = std::net::TcpStream::from(fd);
                        let accepted = stream
                            .set_nonblocking(true)
                            .and_then(|()| TcpStream::from_std(stream));
                        self.inner.send_control(ToPrimary::Accepted {
                            key: self.key.clone(),
                            seq,
                            accepted: accepted.is_ok(),
                        });
                        return accepted.map(Some);
                    }
                    tokio::select! {
                        () = queue.notify.notified() => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// While `refusing`, connections the primary hands to this listener are refused and
    /// go to another worker (Node refuses when `maxConnections` is reached). No effect on
    /// the shared and reuseport policies, where the kernel picks the acceptor.
    pub fn set_refusing(&self, refusing: bool) {
        if let Some(Kind::RoundRobin(queue)) = &self.kind {
            queue.refusing.store(refusing, Ordering::SeqCst);
            if refusing {
                self.inner.refuse_queue(queue);
            }
        }
    }

    /// Stops listening: hand-offs not yet accepted go to other workers.
    fn close(&mut self) {
        if let Some(Kind::RoundRobin(queue)) = self.kind.take() {
            queue.closed.store(true, Ordering::SeqCst);
            self.inner.state().queues.remove(&self.key);
            self.inner.refuse_queue(&queue);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let open = self.kind.is_some();
        self.close();
        if open && !self.inner.stop.is_cancelled() {
            self.inner.send_control(ToPrimary::Close {
                key: self.key.clone(),
            });
        }
    }
}

async fn write_control(
    sender: Arc<tokio::sync::Mutex<ipc::Sender>>,
    mut rx: mpsc::UnboundedReceiver<ToPrimary>,
) {
    while let Some(message) = rx.recv().await {
        if let Err(e) = sender.lock().await.send_control(&message, Vec::new()).await {
            tracing::debug!(error = %e, "channel to the primary closed");
            return;
        }
    }
}

async fn read_loop(
    mut receiver: ipc::Receiver,
    inner: Arc<Inner>,
    messages: mpsc::UnboundedSender<ipc::Received>,
) {
    loop {
        let mut message = match receiver.recv().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "channel to the primary failed");
                break;
            }
        };
        if message.lane() == ipc::Lane::User {
            let _ = messages.send(message);
            continue;
        }
        match message.decode::<ToWorker>() {
            Ok(ToWorker::QueryReply { seq, result }) => {
                let fd = message.take_fds().pop();
                let mut state = inner.state();
                let Some((key, reply)) = state.queries.remove(&seq) else {
                    continue;
                };
                let queue = matches!(result, Ok((Granted::RoundRobin, _))).then(|| {
                    Arc::new(HandoffQueue {
                        key: key.clone(),
                        items: Mutex::default(),
                        notify: Notify::new(),
                        refusing: AtomicBool::new(false),
                        closed: AtomicBool::new(false),
                    })
                });
                // Registered before any NewConn for it is read.
                if let Some(queue) = &queue {
                    state.queues.insert(key, Arc::clone(queue));
                }
                drop(state);
                let answer = QueryAnswer { result, fd, queue };
                if let Err(answer) = reply.send(answer)
                    && let Some(queue) = answer.queue
                {
                    // The listen was abandoned: refuse what comes for it.
                    queue.closed.store(true, Ordering::SeqCst);
                }
            }
            Ok(ToWorker::NewConn { key, seq }) => {
                let fd = message.take_fds().pop();
                let queue = inner.state().queues.get(&key).cloned();
                let taken = match (fd, queue) {
                    (Some(fd), Some(queue))
                        if !inner.stop.is_cancelled()
                            && !queue.closed.load(Ordering::SeqCst)
                            && !queue.refusing.load(Ordering::SeqCst) =>
                    {
                        queue
                            .items
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_back((seq, fd));
                        queue.notify.notify_one();
                        true
                    }
                    _ => false,
                };
                if !taken {
                    inner.send_control(ToPrimary::Accepted {
                        key,
                        seq,
                        accepted: false,
                    });
                }
            }
            Ok(ToWorker::Disconnect) => {
                inner.stop.cancel();
                inner.refuse_pending();
            }
            Err(e) => tracing::warn!(error = %e, "ignoring an undecodable control message"),
        }
    }
    // The primary is gone: exit like a Node worker whose channel closed.
    std::process::exit(0);
}

/// Chains a hook onto the current panic hook: the first panic tells the primary this
/// worker is going down and starts the drain.
fn install_panic_hook(inner: &Arc<Inner>) {
    let inner = Arc::downgrade(inner);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some(inner) = inner.upgrade() {
            if !inner.panicked.swap(true, Ordering::SeqCst) {
                inner.send_control(ToPrimary::GoingDown {
                    reason: info.to_string(),
                });
            }
            inner.stop.cancel();
        }
    }));
}
