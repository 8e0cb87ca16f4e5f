// An ES module HTTP server (`.mjs`): `import`, top-level code, `listen(0)`.
//   GET / -> {"pid": <pid>, "module": "esm"}
import http from 'node:http';

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, module: 'esm' }));
});
server.listen(0, '127.0.0.1');
