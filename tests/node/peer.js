// A Node child for the Rust parent tests (tests/integration/node_ipc.rs): answers the
// ops below over its fork() channel. Plain Node 20, no packages.
'use strict';
const net = require('node:net');

const send = (m, h) => process.send(m, h);
let handles = 0;
let sunk = 0;

process.on('message', (m, handle) => {
  switch (m && m.op) {
    case 'echo':
      send(m);
      break;
    case 'burst': {
      let sum = 0;
      for (let i = 0; i < m.n; i++) {
        sum += i;
        send({ op: 'item', i });
      }
      send({ op: 'burst-done', sum });
      break;
    }
    case 'listen':
      // A listening socket from the parent: serve one connection on it.
      net.createServer((sock) => {
        sock.once('data', (d) => sock.end('pong:' + d));
      }).listen(handle, () => send({ op: 'listening' }));
      break;
    case 'socket': {
      const sock = new net.Socket({ handle, readable: true, writable: true });
      sock.end('hello from node\n', () => send({ op: 'wrote' }));
      break;
    }
    case 'count':
      handles += handle ? 1 : 0;
      send({ op: 'counted', i: m.i, handles });
      break;
    case 'give': {
      const server = net.createServer();
      server.listen(0, '127.0.0.1', () => {
        for (let i = 0; i < m.n; i++) {
          send({ op: 'given', i }, server);
        }
        send({ op: 'given-done', port: server.address().port }, undefined);
      });
      // The parent accepts on its copies; this one only gets what it is handed.
      server.on('connection', (s) => s.destroy());
      break;
    }
    case 'odd': {
      // What JSON.stringify writes that a Rust string cannot hold, and Node's depths.
      let deep = 'bottom';
      for (let i = 0; i < m.depth; i++) deep = [deep];
      send({ op: 'odd', lone: 'a\ud800b', pair: '\ud83d\ude00', low: '\udc00', deep });
      break;
    }
    case 'depth': {
      let depth = 0;
      for (let v = m.deep; Array.isArray(v); v = v[0]) depth++;
      send({ op: 'depth', depth });
      break;
    }
    case 'sink':
      // Taken without an answer: the parent only sends.
      sunk++;
      break;
    case 'sunk':
      send({ op: 'sunk', n: sunk });
      break;
    case 'crash':
      for (let i = 0; i < 100; i++) send({ op: 'item', i });
      process.exit(7);
      break;
    case 'disconnect':
      process.disconnect();
      break;
    default:
      send({ op: 'unknown', got: m });
  }
});
