// Runs formats.js on the cases tests/web/test_js_formats.py sends (JSON on stdin, hex bytes)
// and prints the results (JSON on stdout), so the Python test compares both clients' bytes.
import * as f from '../src/formats.js';
import { SERVICE_SEAL_MINOR, automorphism, imageElements } from '../src/heinfer.js';

const hex = (/** @type {Uint8Array} */ b) => Buffer.from(b).toString('hex');
const unhex = (/** @type {string} */ s) => new Uint8Array(Buffer.from(s, 'hex'));
const words = (/** @type {string[]} */ a) => BigUint64Array.from(a.map(BigInt));
const strings = (/** @type {BigUint64Array} */ a) => Array.from(a, String);

const ops = {
  sha256: (/** @type {any} */ c) => hex(f.sha256(unhex(c.data))),
  shake128: (/** @type {any} */ c) => hex(f.shake128(unhex(c.data), c.length)),
  pack: (/** @type {any} */ c) => hex(f.packBits(words(c.values), c.bits)),
  unpack: (/** @type {any} */ c) => strings(f.unpackBits(unhex(c.data), c.count, c.bits)),
  expand: (/** @type {any} */ c) =>
    strings(f.expandUniform(unhex(c.seed), BigInt(c.q), c.prime, c.index, c.degree, new TextEncoder().encode(c.tag))),
  bfv_fingerprint: (/** @type {any} */ c) => hex(f.bfvFingerprint(c.scheme)),
  ckks_fingerprint: (/** @type {any} */ c) => hex(f.ckksFingerprint(c.params)),
  network_key_fingerprint: (/** @type {any} */ c) => hex(f.networkKeyFingerprint(c.params)),
  frames: (/** @type {any} */ c) => hex(f.encodeFrames(c.magic, c.records.map(unhex))),
  keys: (/** @type {any} */ c) => hex(f.encodeKeys(unhex(c.fingerprint), c.parts.map((/** @type {any} */ [k, v]) => [k, unhex(v)]))),
  decode_fixed: (/** @type {any} */ c) => f.decodeFixedRecords(unhex(c.body), c.record_bytes).map(hex),
  decode_frames: (/** @type {any} */ c) => f.decodeFrames(c.magic, unhex(c.body), c.max_record_bytes).map(hex),
  envelope: (/** @type {any} */ c) => hex(f.wrapEnvelope(c.kind, unhex(c.fingerprint), unhex(c.data))),
  service_minor: () => SERVICE_SEAL_MINOR,
  automorphism: (/** @type {any} */ c) => Array.from(automorphism(Int32Array.from(c.values), c.element, c.degree)),
  image_elements: (/** @type {any} */ c) => imageElements(c.spec, c.degree),
  tags: () => [f.PUBLIC_A_TAG, f.BATCH_A_TAG, f.GALOIS_A_TAG].map((t) => new TextDecoder().decode(t)),
};

let input = '';
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map((/** @type {any} */ c) => {
  try {
    return { ok: ops[/** @type {keyof typeof ops} */ (c.op)](c) };
  } catch (error) {
    return { error: String(error) };
  }
});
process.stdout.write(JSON.stringify(out));
