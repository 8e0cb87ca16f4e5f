// A plain Node HTTP server: no `cluster` import. Under the `cluster` command it becomes a
// worker because its parent speaks Node's cluster protocol.
//   GET /       -> {"pid": <pid>}
//   GET /slow   -> the same after 1.5 s
// With an IPC channel it says hello and echoes every message it gets.
'use strict';
const http = require('http');

const port = Number(process.argv[2] || 0);
const server = http.createServer((req, res) => {
  const reply = () => {
    res.setHeader('x-pid', String(process.pid));
    res.end(JSON.stringify({ pid: process.pid }));
  };
  if (req.url.startsWith('/slow')) {
    console.log('slow request started');
    setTimeout(reply, 1500);
  } else {
    reply();
  }
});
server.listen(port, '127.0.0.1', () => {
  console.log(`pid ${process.pid} serving port ${server.address().port}`);
});
if (process.send) {
  process.on('message', (message) => process.send({ echo: message, pid: process.pid }));
  process.send({ hello: process.pid });
}
