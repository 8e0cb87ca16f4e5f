// A plain Node HTTP server whose memory grows on request, for --max-memory-restart.
//   GET /       -> {"pid": <pid>}
//   GET /grow   -> keeps 96 MiB more (touched, so resident), then {"pid": <pid>}
'use strict';
const http = require('http');

const kept = [];
const port = Number(process.argv[2] || 0);
http
  .createServer((req, res) => {
    if (req.url.startsWith('/grow')) {
      kept.push(Buffer.alloc(96 << 20, 1));
      console.log(`grew to ${kept.length * 96} MiB`);
    }
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ pid: process.pid }));
  })
  .listen(port, '127.0.0.1', function () {
    console.log(`pid ${process.pid} serving port ${this.address().port}`);
  });
