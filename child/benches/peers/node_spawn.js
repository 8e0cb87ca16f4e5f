// Node 20 peer of child's vs_node benchmark: sequential spawn + exit of /bin/true.
// Usage: node node_spawn.js <count>. Prints {"seconds": S}.
'use strict';
const { spawn } = require('node:child_process');

const total = Number(process.argv[2]);
const start = process.hrtime.bigint();
let done = 0;
function next() {
  if (done === total) {
    console.log(JSON.stringify({ seconds: Number(process.hrtime.bigint() - start) / 1e9 }));
    return;
  }
  spawn('/bin/true', [], { stdio: 'ignore' }).on('exit', (code) => {
    if (code !== 0) throw new Error(`exit ${code}`);
    done += 1;
    next();
  });
}
next();
