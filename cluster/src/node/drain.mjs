// Loaded into every Node worker of a Rust primary (`node --require` of its CommonJS form, see
// `Settings::node_keepalive_drain`): a keep-alive-safe drain for unmodified Node servers.
//
// When the primary disconnects a worker (a stop or a rolling reload), Node's cluster code
// calls `server.close()`, and Node's `close()` destroys every idle keep-alive connection at
// once: a client whose next request is already on its way sees the connection drop.
// Instead, a server closed while the worker disconnects stops listening as before, answers
// every later request with `Connection: close` (so each client closes after its
// response and reconnects to another worker), and destroys the connections still idle
// after CLUSTER_DRAIN_IDLE_MS (1000 by default), which no steady client leaves idle.
// Any other `close()` keeps Node's behaviour.
import cluster from 'node:cluster';
import http from 'node:http';

const idleMs = Number(process.env.CLUSTER_DRAIN_IDLE_MS ?? 1000);
const draining = Symbol('cluster.keepAliveDrain');

// Node's close() of an HTTP server begins with closeIdleConnections(), while the server
// still listens: that call is where the drain begins instead. `https` copies this method
// from `http.Server.prototype` when it is loaded, after this module: HTTPS servers drain
// alike without this module loading `https` (and TLS) into every worker.
const closeIdle = http.Server.prototype.closeIdleConnections;
http.Server.prototype.closeIdleConnections = function (...args) {
  if (this[draining] || !this.listening || !(cluster.worker && cluster.worker.exitedAfterDisconnect)) {
    return closeIdle.apply(this, args);
  }
  this[draining] = true;
  this.prependListener('request', (req, res) => {
    res.shouldKeepAlive = false;
  });
  setTimeout(() => closeIdle.apply(this, args), idleMs).unref();
};
