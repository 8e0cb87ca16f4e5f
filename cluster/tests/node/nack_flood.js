// A hostile Node worker for the `cluster` command: the first worker (worker id 1),
// once it listens, writes NODE_HANDLE lines that carry no descriptor to its channel as
// fast as it can and never reads the NODE_HANDLE_NACK each of them is owed (its event
// loop never runs again). Later workers serve:
//   GET /  -> {"pid": <pid>}
'use strict';
const cluster = require('cluster');
const fs = require('fs');
const http = require('http');

const server = http.createServer((req, res) => res.end(JSON.stringify({ pid: process.pid })));
server.listen(0, '127.0.0.1', () => {
  // Node's cluster code takes NODE_UNIQUE_ID out of the environment at start-up.
  if (!cluster.worker || cluster.worker.id !== 1) {
    return;
  }
  // Synchronously: the event loop that would write a console.log never runs again.
  fs.writeSync(1, `pid ${process.pid} floods its primary\n`);
  const fd = (process.channel && process.channel.fd) || 3;
  const lines = Buffer.from(
    '{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn"}}\n'.repeat(1024),
  );
  let at = 0;
  for (;;) {
    try {
      at += fs.writeSync(fd, lines, at);
      if (at === lines.length) {
        at = 0;
      }
    } catch (e) {
      if (e.code !== 'EAGAIN') {
        throw e;
      }
    }
  }
});
