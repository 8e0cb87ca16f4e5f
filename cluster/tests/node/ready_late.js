// Says `ready` (PM2's wait_ready) 500 ms after it listens: `GET /` -> {"pid": <pid>}.
'use strict';
const http = require('http');

const server = http.createServer((req, res) => res.end(JSON.stringify({ pid: process.pid })));
server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  setTimeout(() => process.send('ready'), 500);
});
