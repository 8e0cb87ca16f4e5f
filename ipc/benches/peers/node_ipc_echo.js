// Node 20 fork() IPC echo, the peer of ipc's echo benchmark.
// Usage: node node_ipc_echo.js <payload bytes> <messages> <in flight>
// Prints one JSON line: {"messages": N, "seconds": S}.
'use strict';
const { fork } = require('node:child_process');

if (process.argv[2] === 'child') {
  process.on('message', (m) => process.send(m));
  return;
}

const size = Number(process.argv[2]);
const total = Number(process.argv[3]);
const window = Number(process.argv[4]);
const payload = 'x'.repeat(size);
const child = fork(__filename, ['child']);
let sent = 0;
let received = 0;
const start = process.hrtime.bigint();
child.on('message', () => {
  received += 1;
  if (sent < total) {
    sent += 1;
    child.send(payload);
  } else if (received === total) {
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    console.log(JSON.stringify({ messages: total, seconds }));
    child.disconnect();
  }
});
for (; sent < Math.min(window, total); sent += 1) child.send(payload);
