// A plain Node HTTP server on a Unix socket path (argv[2]): `server.listen(path)`.
//   GET / -> {"pid": <pid>}
'use strict';
const http = require('http');

const path = process.argv[2];
const server = http.createServer((req, res) => {
  res.end(JSON.stringify({ pid: process.pid }));
});
server.listen(path, () => {
  console.log(`pid ${process.pid} serving ${server.address()}`);
});
