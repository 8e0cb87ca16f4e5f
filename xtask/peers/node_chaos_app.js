// The Node app of `cargo xtask chaos`, run by the `cluster` command as its workers:
//   cluster -w 3 --log-format json -- xtask/peers/node_chaos_app.js <port>
// GET / answers `hello world`; GET /burn?ms=N keeps this worker's only thread busy for N
// ms (at most 5000), as a CPU-bound handler would. Every response names the process that
// answered in `x-worker-pid`, as httpd-demo's do.
'use strict';
const http = require('node:http');

const port = Number(process.argv[2] || 0);
const pid = String(process.pid);

http
  .createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    res.setHeader('x-worker-pid', pid);
    if (url.pathname === '/burn') {
      const ms = Math.min(Number(url.searchParams.get('ms')) || 0, 5000);
      const until = Date.now() + ms;
      while (Date.now() < until) {
        // busy: nothing else of this worker runs meanwhile
      }
      const body = `burnt ${ms} ms\n`;
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
      res.end(body);
      return;
    }
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 12 });
    res.end('hello world\n');
  })
  .listen(port, '127.0.0.1');
