// A Node parent for the Rust child tests: forks the Rust peer (tests/src/bin/node_peer.rs)
// with execPath, as `child_process.fork(script, {execPath})` does, and runs one scenario.
// Usage: node drive_rust.js <rust binary> <scenario>. Prints "ok <scenario>" and exits 0.
'use strict';
const { fork, spawn } = require('node:child_process');
const net = require('node:net');
const assert = require('node:assert');

const [bin, scenario] = process.argv.slice(2);
const viaSpawn = scenario === 'spawn';
const child = viaSpawn
  ? spawn(bin, ['peer'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  : fork('peer', [], { execPath: bin, execArgv: [] });

const done = () => {
  console.log('ok ' + scenario);
  child.disconnect();
};
const fail = (e) => {
  console.error('FAIL ' + scenario + ': ' + (e && e.stack ? e.stack : e));
  process.exit(1);
};
process.on('uncaughtException', fail);

const next = (() => {
  const waiting = [];
  const queued = [];
  child.on('message', (m, h) => (waiting.length ? waiting.shift()([m, h]) : queued.push([m, h])));
  return () => new Promise((r) => (queued.length ? r(queued.shift()) : waiting.push(r)));
})();

const scenarios = {
  async echo() {
    const big = 'é\n"'.repeat(350000); // about 1 MiB of JSON
    for (const m of [
      { op: 'echo', nested: { a: [1, { b: null, c: true }], s: 'unicode ☃ \u2028 and\nnewlines' } },
      { op: 'echo', big },
    ]) {
      child.send(m);
      const [back] = await next();
      assert.deepStrictEqual(back, m);
    }
    done();
  },
  async many() {
    let sum = 0;
    for (let i = 0; i < 10000; i++) child.send({ op: 'echo', i });
    for (let i = 0; i < 10000; i++) sum += (await next())[0].i;
    assert.strictEqual(sum, (9999 * 10000) / 2);
    child.send({ op: 'burst', n: 10000 });
    let got = 0;
    for (;;) {
      const [m] = await next();
      if (m.op === 'burst-done') {
        assert.strictEqual(m.sum, got);
        break;
      }
      got += m.i;
    }
    done();
  },
  async listen() {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      child.send({ op: 'listen' }, server);
      server.close(); // the child's copy still listens
      next().then(([m]) => {
        assert.strictEqual(m.op, 'listening');
        const c = net.connect(port, '127.0.0.1', () => c.write('ping'));
        let text = '';
        c.on('data', (d) => (text += d));
        c.on('end', () => {
          assert.strictEqual(text, 'pong:ping');
          done();
        });
      });
    });
  },
  async socket() {
    const server = net.createServer((s) => {
      let text = '';
      s.on('data', (d) => (text += d));
      s.on('end', () => {
        assert.strictEqual(text, 'hello from rust\n');
        server.close();
        done();
      });
    });
    server.listen(0, '127.0.0.1', () => {
      const c = net.connect(server.address().port, '127.0.0.1', () => child.send({ op: 'socket' }, c));
    });
  },
  async handles() {
    const server = net.createServer();
    server.listen(0, '127.0.0.1', async () => {
      for (let i = 0; i < 100; i++) child.send({ op: 'count', i }, server);
      for (let i = 0; i < 100; i++) {
        const [m] = await next();
        assert.deepStrictEqual(m, { op: 'counted', i, handles: i + 1 });
      }
      server.close();
      child.send({ op: 'give', n: 100 });
      for (let i = 0; i < 100; i++) {
        const [m, h] = await next();
        assert.strictEqual(m.i, i);
        assert.ok(h, 'a handle with every given message');
        h.close();
      }
      assert.strictEqual((await next())[0].op, 'given-done');
      done();
    });
  },
  async disconnect() {
    child.send({ op: 'disconnect' });
    child.on('disconnect', () => console.log('ok ' + scenario));
  },
  async crash() {
    child.send({ op: 'crash' });
    child.on('exit', (code) => {
      assert.strictEqual(code, 7);
      console.log('ok ' + scenario);
    });
  },
  async spawn() {
    child.send({ op: 'echo', via: 'spawn' });
    assert.deepStrictEqual((await next())[0], { op: 'echo', via: 'spawn' });
    done();
  },
};

child.on('exit', (code, signal) => {
  if (scenario !== 'crash' && code !== 0) fail(new Error(`rust child exited ${code} ${signal}`));
});
scenarios[scenario]().catch(fail);
