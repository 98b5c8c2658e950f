// Build the page `heinfer serve` shows into the Python package (src/heinfer/web/static/).
//
// No bundler: the page is plain ES modules. This copies web/src/ and the runtime dependencies
// (node-seal's WebAssembly build, fzstd, @noble/hashes' SHA-2 and SHA-3 modules) next to each
// other, rewriting the bare imports to their vendored paths. The output is committed (reviewed build output),
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
for (const name of ['index.html', 'page.css', 'page.js']) {
  copyFileSync(join(here, 'src', name), join(out, name));
}
/**
 * Copy web/src/`name`, replacing each bare import by its vendored path (and failing if one is gone).
 * @param {string} name
 * @param {Record<string, string>} imports
 */
function rewritten(name, imports) {
  let text = readFileSync(join(here, 'src', name), 'utf8');
  for (const [bare, local] of Object.entries(imports)) {
    if (!text.includes(`from '${bare}';`)) throw new Error(`${name} no longer imports '${bare}'`);
    text = text.replace(`from '${bare}';`, `from '${local}';`);
  }
  writeFileSync(join(out, name), text);
}
rewritten('formats.js', {
  '@noble/hashes/sha2.js': './vendor/noble-hashes/sha2.js',
  '@noble/hashes/sha3.js': './vendor/noble-hashes/sha3.js',
});
mkdirSync(join(out, 'vendor', 'noble-hashes'));
for (const name of ['sha2.js', 'sha3.js', '_md.js', '_u64.js', 'utils.js', 'LICENSE']) {
  copyFileSync(join(modules, '@noble', 'hashes', name), join(out, 'vendor', 'noble-hashes', name));
}
rewritten('heinfer.js', { fzstd: './vendor/fzstd.js' });
copyFileSync(join(modules, 'fzstd', 'esm', 'index.mjs'), join(out, 'vendor', 'fzstd.js'));
copyFileSync(join(modules, 'fzstd', 'LICENSE'), join(out, 'vendor', 'fzstd.LICENSE'));
for (const name of ['index_throws.js', 'seal_throws.js', 'seal_throws.wasm']) {
  copyFileSync(join(modules, 'node-seal', 'dist', name), join(out, 'vendor', 'node-seal', name));
}
copyFileSync(join(modules, 'node-seal', 'LICENSE'), join(out, 'vendor', 'node-seal', 'LICENSE'));
console.log(`built the page into ${out}`);
