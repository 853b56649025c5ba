// Checks Mermaid text on stdin with Mermaid's own parser, offline.
//
//   node tests/mermaid_parse.mjs < diagram.mmd
//
// Prints "mermaid: ok (<diagram type>)" and exits 0 when the text parses,
// prints the parser's error and exits 1 when it does not, and exits 2 when
// the npm packages are missing (run `npm ci` in the repository root;
// `make test` does). Mermaid sanitises labels with DOMPurify, which needs a
// DOM, so a jsdom window stands in for the browser's.

import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

async function load(name) {
  try {
    return await import(name);
  } catch (e) {
    console.error(`mermaid_parse: cannot load the npm package '${name}' (${e.code || e.message}); ` +
                  `run 'npm ci' in ${root}`);
    process.exit(2);
  }
}

const { JSDOM } = await load('jsdom');
const dom = new JSDOM('<!DOCTYPE html><html><body></body></html>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await load('mermaid');

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const text = Buffer.concat(chunks).toString('utf8');
if (text.trim() === '') {
  console.error('mermaid_parse: no text on stdin');
  process.exit(1);
}
try {
  const result = await mermaid.parse(text);
  console.log(`mermaid: ok (${result.diagramType})`);
} catch (e) {
  console.error(`mermaid: ${e.message || e}`);
  process.exit(1);
}
