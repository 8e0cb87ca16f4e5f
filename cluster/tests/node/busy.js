// Listens, then spins in a busy loop that never yields to the event loop: it reads
// neither its channel nor signals' handlers, only SIGKILL ends it.
'use strict';
const http = require('http');

const server = http.createServer((req, res) => res.end('hi'));
server.listen(0, '127.0.0.1', () => {
  setTimeout(() => {
    for (;;) {}
  }, 100);
});
