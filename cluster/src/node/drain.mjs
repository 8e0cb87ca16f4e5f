// Loaded into every Node worker of a Rust primary (`node --import`, see
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
import https from 'node:https';

const idleMs = Number(process.env.CLUSTER_DRAIN_IDLE_MS ?? 1000);
const draining = Symbol('cluster.keepAliveDrain');

function patch(proto) {
  const close = proto.close;
  proto.close = function (...args) {
    if (this[draining] || !(cluster.worker && cluster.worker.exitedAfterDisconnect)) {
      return close.apply(this, args);
    }
    this[draining] = true;
    // Node's close() begins with closeIdleConnections(): skip it for this call only.
    this.closeIdleConnections = () => {};
    try {
      close.apply(this, args);
    } finally {
      delete this.closeIdleConnections;
    }
    this.prependListener('request', (req, res) => {
      res.shouldKeepAlive = false;
    });
    setTimeout(() => this.closeIdleConnections(), idleMs).unref();
    return this;
  };
}

patch(http.Server.prototype);
if (https.Server.prototype.close !== http.Server.prototype.close) {
  patch(https.Server.prototype);
}
