// Does not parse: every worker exits at once with Node's SyntaxError on stderr.
'use strict';
const broken = ;
