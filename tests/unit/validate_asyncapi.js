// Validates an AsyncAPI document with the reference parser (@asyncapi/parser) and prints its
// diagnostics as JSON: [{severity, code, path, message}], severity 0 = error, 1 = warning.
// Usage: NODE_PATH=<node_modules> node validate_asyncapi.js docs/asyncapi.yaml
'use strict';
const fs = require('fs');
const { Parser } = require('@asyncapi/parser');

async function main(path) {
  const { document, diagnostics } = await new Parser().parse(fs.readFileSync(path, 'utf8'));
  const found = diagnostics.map((d) => ({
    severity: d.severity, code: String(d.code), path: d.path.join('.'), message: d.message,
  }));
  process.stdout.write(JSON.stringify({ parsed: document !== undefined, diagnostics: found }));
}

main(process.argv[2]).catch((err) => { console.error(err); process.exit(2); });
