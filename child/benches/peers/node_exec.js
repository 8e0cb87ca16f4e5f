// Node 20 peer of child's vs_node benchmark: exec capturing <bytes> of stdout.
// Usage: node node_exec.js <bytes>. Prints {"seconds": S}.
'use strict';
const { exec } = require('node:child_process');

const bytes = Number(process.argv[2]);
const start = process.hrtime.bigint();
// Default (utf8) encoding: what exec gives a Node user who passes no options.
exec(`head -c ${bytes} /dev/zero`, { maxBuffer: 2 * bytes }, (err, stdout) => {
  if (err) throw err;
  if (stdout.length !== bytes) throw new Error(`got ${stdout.length} bytes`);
  console.log(JSON.stringify({ seconds: Number(process.hrtime.bigint() - start) / 1e9 }));
});
