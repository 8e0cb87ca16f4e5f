// Node 20 cluster hello-world HTTP server, the peer of httpd-demo in `cargo xtask bench`.
// Usage: NODE_CLUSTER_SCHED_POLICY=rr|none node node_cluster_http.js <port> <workers>
// Like httpd-demo, the primary prints `listening on http://ADDR` once the first worker
// listens, then one `worker listening pid=N` line per worker that listens (a dead worker
// is replaced at once, so respawn time can be measured). Every response names the worker
// in `X-Worker-Pid` (the bench's fairness figures), as httpd-demo's and nginx's do.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.argv[2] || 0);
const workers = Number(process.argv[3] || 2);

if (cluster.isPrimary) {
  let announced = false;
  cluster.on('listening', (worker, address) => {
    if (!announced) {
      announced = true;
      console.log(`listening on http://${address.address}:${address.port}`);
    }
    console.log(`worker listening pid=${worker.process.pid}`);
  });
  cluster.on('exit', (worker, code, signal) => {
    if (!worker.exitedAfterDisconnect) {
      console.log(`worker exited pid=${worker.process.pid} ${signal || code}, forking a replacement`);
      cluster.fork();
    }
  });
  for (let i = 0; i < workers; i += 1) cluster.fork();
} else {
  http
    .createServer((req, res) => {
      res.writeHead(200, { 'Content-Type': 'text/plain', 'X-Worker-Pid': process.pid });
      res.end('hello world\n');
    })
    .listen(port, '127.0.0.1');
}
