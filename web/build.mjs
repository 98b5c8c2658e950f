// Build the page `heinfer serve` shows into the Python package (src/heinfer/web/static/).
//
// No bundler: the page is plain ES modules. This copies web/src/ and the two runtime
// dependencies (node-seal's WebAssembly build, fzstd) next to each other, rewriting the one
// bare import ('fzstd') to its vendored path. The output is committed (reviewed build output),
// so `pip install .` serves the page without npm; tests/web/test_page_build.py fails when it is
// stale. Usage: npm run build [-- OUTDIR]
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2] ?? join(here, '..', 'src', 'heinfer', 'web', 'static');
const modules = join(here, 'node_modules');

rmSync(out, { recursive: true, force: true });
mkdirSync(join(out, 'vendor', 'node-seal'), { recursive: true });
for (const name of ['index.html', 'page.css', 'page.js', 'formats.js']) {
  copyFileSync(join(here, 'src', name), join(out, name));
}
const client = readFileSync(join(here, 'src', 'heinfer.js'), 'utf8');
if (!client.includes("from 'fzstd';")) throw new Error("heinfer.js no longer imports 'fzstd'");
writeFileSync(join(out, 'heinfer.js'), client.replace("from 'fzstd';", "from './vendor/fzstd.js';"));
copyFileSync(join(modules, 'fzstd', 'esm', 'index.mjs'), join(out, 'vendor', 'fzstd.js'));
copyFileSync(join(modules, 'fzstd', 'LICENSE'), join(out, 'vendor', 'fzstd.LICENSE'));
for (const name of ['index_throws.js', 'seal_throws.js', 'seal_throws.wasm']) {
  copyFileSync(join(modules, 'node-seal', 'dist', name), join(out, 'vendor', 'node-seal', name));
}
copyFileSync(join(modules, 'node-seal', 'LICENSE'), join(out, 'vendor', 'node-seal', 'LICENSE'));
console.log(`built the page into ${out}`);
