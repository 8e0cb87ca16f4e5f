// Two plain Node `http` servers in one worker, both on `listen(0)` without a host: every
// worker's first server shares one port, its second another (Node's rule).
'use strict';
const http = require('http');

for (const name of ['first', 'second']) {
  const server = http.createServer((req, res) => res.end(`${name} ${process.pid}`));
  server.listen(0, () => console.log(`${name} serving port ${server.address().port}`));
}
