// A worker that exits at once, every time: a crash loop.
'use strict';
console.error('crashing on purpose');
process.exit(3);
