// A worker that leaves on its own right after it listens: `worker` calls
// cluster.worker.disconnect(), `process` process.disconnect(), `exit` process.exit(0).
'use strict';
const cluster = require('cluster');
const http = require('http');

const how = process.argv[2] || 'worker';
const server = http.createServer((req, res) => res.end('hi'));
server.listen(0, '127.0.0.1', () => {
  if (how === 'worker') cluster.worker.disconnect();
  else if (how === 'process') process.disconnect();
  else process.exit(0);
});
