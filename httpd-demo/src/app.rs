//! The HTTP routes of the demo server, independent of how connections arrive.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;

/// The header on every response that names the worker process that answered (its pid),
/// so that a client or a bench can see how requests spread over the workers.
pub(crate) const WORKER_PID: HeaderName = HeaderName::from_static("x-worker-pid");

/// The longest `/sleep` honoured, so a request cannot pin a worker for ever.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// The longest `/burn` honoured: a worker busy for longer would be taken for hung.
const MAX_BURN: Duration = Duration::from_secs(5);

/// What every request handler of one worker shares.
#[derive(Debug)]
pub(crate) struct AppState {
    worker_id: u64,
    pid: u32,
    /// `pid` as the [`WORKER_PID`] header's value, made once (a clone shares its bytes).
    pid_header: HeaderValue,
    /// Which code this worker runs ([`build_id`]), computed once at its start.
    build: String,
    allow_crash: bool,
    /// Whether a stop has begun; watched so a test can see the moment it starts.
    draining: watch::Sender<bool>,
    in_flight: watch::Sender<usize>,
}

impl AppState {
    pub(crate) fn new(worker_id: u64, allow_crash: bool) -> Arc<Self> {
        Arc::new(Self {
            worker_id,
            pid: std::process::id(),
            pid_header: HeaderValue::from(std::process::id()),
            build: build_id(),
            allow_crash,
            draining: watch::Sender::new(false),
            in_flight: watch::Sender::new(0),
        })
    }

    /// The cluster's id of this worker.
    pub(crate) fn worker_id(&self) -> u64 {
        self.worker_id
    }

    /// Watches how many requests are being handled right now.
    pub(crate) fn in_flight(&self) -> watch::Receiver<usize> {
        self.in_flight.subscribe()
    }

    /// From now on every response says `Connection: close` and `/readyz` answers 503.
    pub(crate) fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Watches whether draining has started.
    #[cfg(test)]
    pub(crate) fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

/// Which code this process runs: the package version and the modification time (in
/// nanoseconds since the epoch, hex) of the executable it was started from, read through
/// `/proc/self/exe`, which names the running file even after it is replaced or deleted
/// on disk. A rebuilt, copied or touched binary gets a new one: `0.1.0+1812f0c4a3b2d100`.
pub(crate) fn build_id() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let modified = std::fs::metadata("/proc/self/exe")
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    match modified {
        Some(since) => format!("{version}+{:x}", since.as_nanos()),
        None => format!("{version}+unknown"),
    }
}

/// Answers one request.
///
/// Every response names the worker's pid in `x-worker-pid` ([`WORKER_PID`]).
/// `GET /` says hello, `GET /worker` names the worker (id, pid and [`build_id`]), `GET /sleep?ms=N` answers after N
/// milliseconds, `GET /burn?ms=N` keeps the worker's only thread busy for N milliseconds
/// (at most [`MAX_BURN`]: a CPU-bound handler, for `cargo xtask chaos`), `GET /crash`
/// panics when crashing is allowed (404 otherwise).
///
/// `GET /healthz` is 200 while the process can serve (also while it drains: a liveness
/// probe must not kill a worker that is finishing its requests). `GET /readyz` is 200
/// while the worker takes new work and 503 from the moment its stop begins, so a
/// balancer that checks it sends no new connections to a stopping worker. Both bodies
/// name the worker: `{"status": "ready", "id": 3, "pid": 1234}`.
pub(crate) async fn handle<B>(req: Request<B>, state: Arc<AppState>) -> Response<Full<Bytes>> {
    let _counted = InFlight::enter(&state);
    let mut response = route(&req, &state).await;
    response
        .headers_mut()
        .insert(WORKER_PID, state.pid_header.clone());
    if state.is_draining() {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Counts a request as in flight until dropped (also when its handler panics).
struct InFlight<'a>(&'a AppState);

impl<'a> InFlight<'a> {
    fn enter(state: &'a AppState) -> Self {
        count(&state.in_flight, |n| *n += 1);
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        count(&self.0.in_flight, |n| *n -= 1);
    }
}

/// Changes the count; wakes its watchers only if there are any (a test or a drain log
/// that subscribes later reads the current count), so a request costs no notification.
fn count(in_flight: &watch::Sender<usize>, change: impl FnOnce(&mut usize)) {
    in_flight.send_if_modified(|n| {
        change(n);
        in_flight.receiver_count() > 0
    });
}

async fn route<B>(req: &Request<B>, state: &AppState) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(
        path,
        "/" | "/worker" | "/sleep" | "/burn" | "/crash" | "/healthz" | "/readyz"
    ) {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match path {
        "/" => text(StatusCode::OK, "hello world\n"),
        "/worker" => json(
            StatusCode::OK,
            format!(
                "{{\"id\": {}, \"pid\": {}, \"build\": \"{}\"}}\n",
                state.worker_id, state.pid, state.build
            ),
        ),
        "/healthz" => status(StatusCode::OK, "healthy", state),
        "/readyz" if state.is_draining() => {
            status(StatusCode::SERVICE_UNAVAILABLE, "draining", state)
        }
        "/readyz" => status(StatusCode::OK, "ready", state),
        "/sleep" => match sleep_millis(req.uri().query()) {
            Some(ms) => {
                let wait = Duration::from_millis(ms).min(MAX_SLEEP);
                tracing::info!(ms = wait.as_millis() as u64, "sleep request in flight");
                tokio::time::sleep(wait).await;
                text(StatusCode::OK, format!("slept {} ms\n", wait.as_millis()))
            }
            None => text(StatusCode::BAD_REQUEST, "usage: /sleep?ms=N\n"),
        },
        "/burn" => match sleep_millis(req.uri().query()) {
            Some(ms) => {
                let burn = Duration::from_millis(ms).min(MAX_BURN);
                burn_cpu(burn);
                text(StatusCode::OK, format!("burnt {} ms\n", burn.as_millis()))
            }
            None => text(StatusCode::BAD_REQUEST, "usage: /burn?ms=N\n"),
        },
        _ if state.allow_crash => {
            panic!("crash requested by GET /crash")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Spins on the calling thread for `burn`, as a CPU-bound handler would: nothing else of
/// this single-threaded worker runs meanwhile.
fn burn_cpu(burn: Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < burn {
        std::hint::spin_loop();
    }
}

fn sleep_millis(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
}

/// A `/healthz` or `/readyz` answer naming the worker.
fn status(code: StatusCode, word: &str, state: &AppState) -> Response<Full<Bytes>> {
    let body = format!(
        "{{\"status\": \"{word}\", \"id\": {}, \"pid\": {}}}\n",
        state.worker_id, state.pid
    );
    json(code, body)
}

fn json(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A plain-text response; a `&'static str` body is served without a copy.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn get(path: &str, state: &Arc<AppState>) -> (StatusCode, String, Option<String>) {
        let req = Request::get(path).body(()).unwrap();
        let response = handle(req, Arc::clone(state)).await;
        let status = response.status();
        let connection = response
            .headers()
            .get(CONNECTION)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            String::from_utf8(body.to_vec()).unwrap(),
            connection,
        )
    }

    #[track_caller]
    fn check(got: (StatusCode, String, Option<String>), status: StatusCode, body: &str) {
        assert_eq!((got.0, got.1.as_str()), (status, body));
    }

    #[tokio::test]
    async fn hello() {
        check(
            get("/", &AppState::new(1, false)).await,
            StatusCode::OK,
            "hello world\n",
        );
    }

    #[tokio::test]
    async fn every_response_names_the_worker_pid() {
        let state = AppState::new(1, false);
        for path in ["/", "/nope", "/healthz"] {
            let response = handle(Request::get(path).body(()).unwrap(), Arc::clone(&state)).await;
            let pid = response
                .headers()
                .get(WORKER_PID)
                .map(|v| v.to_str().unwrap().to_owned());
            assert_eq!(pid, Some(std::process::id().to_string()), "{path}");
        }
    }

    #[tokio::test]
    async fn worker_names_id_and_pid() {
        let expected = format!(
            "{{\"id\": 7, \"pid\": {}, \"build\": \"{}\"}}\n",
            std::process::id(),
            build_id()
        );
        check(
            get("/worker", &AppState::new(7, false)).await,
            StatusCode::OK,
            &expected,
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_answers_after_the_delay() {
        let state = AppState::new(1, false);
        let start = tokio::time::Instant::now();
        check(
            get("/sleep?ms=250", &state).await,
            StatusCode::OK,
            "slept 250 ms\n",
        );
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn burn_keeps_the_thread_busy_and_is_capped() {
        let state = AppState::new(1, false);
        let start = std::time::Instant::now();
        check(
            get("/burn?ms=30", &state).await,
            StatusCode::OK,
            "burnt 30 ms\n",
        );
        assert!(start.elapsed() >= Duration::from_millis(30));
        check(
            get("/burn", &state).await,
            StatusCode::BAD_REQUEST,
            "usage: /burn?ms=N\n",
        );
    }

    #[tokio::test]
    async fn sleep_without_ms_is_a_bad_request() {
        let state = AppState::new(1, false);
        check(
            get("/sleep?s=1", &state).await,
            StatusCode::BAD_REQUEST,
            "usage: /sleep?ms=N\n",
        );
    }

    #[tokio::test]
    async fn crash_is_not_found_unless_allowed() {
        check(
            get("/crash", &AppState::new(1, false)).await,
            StatusCode::NOT_FOUND,
            "not found\n",
        );
    }

    #[tokio::test]
    #[should_panic(expected = "crash requested")]
    async fn crash_panics_when_allowed() {
        get("/crash", &AppState::new(1, true)).await;
    }

    #[tokio::test]
    async fn unknown_path_and_wrong_method() {
        let state = AppState::new(1, false);
        check(
            get("/nope", &state).await,
            StatusCode::NOT_FOUND,
            "not found\n",
        );
        let req = Request::post("/").body(()).unwrap();
        assert_eq!(
            handle(req, state).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn health_and_readiness_name_the_worker() {
        let state = AppState::new(5, false);
        let pid = std::process::id();
        let body = |word: &str| format!("{{\"status\": \"{word}\", \"id\": 5, \"pid\": {pid}}}\n");
        check(
            get("/healthz", &state).await,
            StatusCode::OK,
            &body("healthy"),
        );
        check(get("/readyz", &state).await, StatusCode::OK, &body("ready"));
    }

    #[tokio::test]
    async fn readiness_fails_from_the_moment_a_stop_begins() {
        let state = AppState::new(5, false);
        let mut draining = state.draining();
        assert!(!*draining.borrow_and_update());
        state.start_draining();
        assert!(draining.has_changed().unwrap());
        let pid = std::process::id();
        let ready = get("/readyz", &state).await;
        assert_eq!(ready.2.as_deref(), Some("close"));
        check(
            ready,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{{\"status\": \"draining\", \"id\": 5, \"pid\": {pid}}}\n"),
        );
        // Still alive: a liveness probe must not kill a draining worker.
        assert_eq!(get("/healthz", &state).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn draining_responses_close_the_connection() {
        let state = AppState::new(1, false);
        assert_eq!(get("/", &state).await.2, None);
        state.start_draining();
        assert_eq!(get("/", &state).await.2.as_deref(), Some("close"));
    }
}
