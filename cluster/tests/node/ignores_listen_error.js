// Like Express 5's `app.listen(port, cb)`: the listen error reaches a handler that
// ignores it, and the process lives on without a listener (a timer keeps it alive).
'use strict';
const http = require('http');

const server = http.createServer((req, res) => res.end('hi'));
server.on('error', (e) => console.error(`listen error ignored: ${e.code}`));
server.listen(Number(process.argv[2]), '127.0.0.1');
setInterval(() => {}, 1000);
