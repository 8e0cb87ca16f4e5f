// An Express-style app from a plain script, on `http` alone (no npm): an app object with
// `use` middleware, `get`/`post` routes with `:params`, a JSON body parser, a 404 and an
// error handler, and `app.listen(port, host, cb)` as Express spells it.
//   GET  /users/:id    -> {"id": ":id", "pid": <pid>, "requestId": <n>}
//   POST /echo (JSON)  -> {"echo": <body>, "pid": <pid>}
//   GET  /boom         -> 500 {"error": "boom"} (a thrown route error)
//   anything else      -> 404 {"error": "not found"}
'use strict';
const http = require('http');

function express() {
  const stack = [];
  const routes = [];
  const app = (req, res) => {
    res.json = (status, value) => {
      res.statusCode = status;
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify(value));
    };
    const url = new URL(req.url, 'http://localhost');
    const route = routes.find((r) => r.method === req.method && r.pattern.test(url.pathname));
    const handlers = [...stack];
    if (route) {
      const match = route.pattern.exec(url.pathname);
      req.params = Object.fromEntries(route.names.map((n, i) => [n, match[i + 1]]));
      handlers.push(route.handler);
    } else {
      handlers.push((req, res) => res.json(404, { error: 'not found' }));
    }
    let index = 0;
    const next = (err) => {
      if (err) return res.json(500, { error: err.message });
      const handler = handlers[index++];
      try {
        handler(req, res, next);
      } catch (e) {
        next(e);
      }
    };
    next();
  };
  app.use = (fn) => stack.push(fn);
  for (const method of ['get', 'post']) {
    app[method] = (path, handler) => {
      const names = [];
      const source = path.replace(/:(\w+)/g, (_, name) => {
        names.push(name);
        return '([^/]+)';
      });
      routes.push({ method: method.toUpperCase(), pattern: new RegExp(`^${source}$`), names, handler });
    };
  }
  app.listen = (...args) => http.createServer(app).listen(...args);
  return app;
}

const app = express();
let served = 0;
app.use((req, res, next) => {
  served += 1;
  req.requestId = served;
  res.setHeader('x-pid', String(process.pid));
  next();
});
app.use((req, res, next) => {
  if (req.method !== 'POST') return next();
  let body = '';
  req.setEncoding('utf8');
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => {
    try {
      req.body = JSON.parse(body || 'null');
      next();
    } catch (e) {
      res.json(400, { error: 'bad json' });
    }
  });
});
app.get('/users/:id', (req, res) => res.json(200, { id: req.params.id, pid: process.pid, requestId: req.requestId }));
app.post('/echo', (req, res) => res.json(200, { echo: req.body, pid: process.pid }));
app.get('/boom', () => { throw new Error('boom'); });

const port = Number(process.argv[2] || 0);
app.listen(port, '127.0.0.1', () => console.log(`express-style app on pid ${process.pid}`));
