// Logs a long line on stdout for every request: `GET /` -> {"pid": <pid>}.
'use strict';
const http = require('http');

const pad = 'x'.repeat(2000);
const server = http.createServer((req, res) => {
  console.log(`request ${req.url} ${pad}`);
  res.end(JSON.stringify({ pid: process.pid }));
});
server.listen(Number(process.argv[2] || 0), '127.0.0.1');
