// @ts-check
/**
 * heinfer's wire formats, in plain JavaScript with no SEAL dependency.
 *
 * Everything here mirrors a piece of the Python client byte for byte (tests/web/test_js_formats.py
 * feeds both the same inputs): SHA-256 and SHAKE-128 (@noble/hashes; parameter fingerprints, seed
 * expansion), bit packing, and the frames around ciphertexts. The lattice
 * work itself (key generation, encryption, decryption) is Microsoft SEAL's, compiled to
 * WebAssembly (node-seal); see heinfer.js.
 */

import { sha256 as nobleSha256 } from '@noble/hashes/sha2.js';
import { shake128 as nobleShake128 } from '@noble/hashes/sha3.js';

const enc = new TextEncoder();

// -- hashes ------------------------------------------------------------------------------------
// From @noble/hashes (MIT, pinned in package-lock.json, vendored into the page by build.mjs).

/**
 * SHA-256 of `data`, synchronously (parameter fingerprints). Not crypto.subtle: subtle exists
 * only in secure contexts, and the page may be served over plain HTTP on a LAN address.
 * @param {Uint8Array} data
 * @returns {Uint8Array}
 */
export function sha256(data) {
  return nobleSha256(data);
}

/**
 * SHAKE-128(data) truncated to `length` bytes (FIPS 202): the XOF heinfer expands public seeds
 * with (Python: hashlib.shake_128).
 * @param {Uint8Array} data
 * @param {number} length
 * @returns {Uint8Array}
 */
export function shake128(data, length) {
  return nobleShake128(data, { dkLen: length });
}

// -- bit packing -------------------------------------------------------------------------------

/**
 * Pack integers below 2**bits into exactly ceil(n*bits/8) bytes: one little-endian bit stream,
 * value k at bits [k*bits, (k+1)*bits) (Python: heinfer.he.backend.pack_bits). Works on the
 * values' 32-bit halves (little-endian hosts: every browser, Node), a byte at a time, with no
 * BigInt per value: a coeff-batch request packs millions of them.
 * @param {BigUint64Array} values
 * @param {number} bits 1..64
 * @returns {Uint8Array}
 */
export function packBits(values, bits) {
  const out = new Uint8Array(Math.ceil((values.length * bits) / 8));
  const halves = new Uint32Array(values.buffer, values.byteOffset, 2 * values.length);
  const loMask = bits >= 32 ? 0xffffffff : 2 ** bits - 1;
  const hiMask = bits >= 64 ? 0xffffffff : bits > 32 ? 2 ** (bits - 32) - 1 : 0;
  let at = 0; // bit position in out
  for (let i = 0; i < values.length; i++) {
    let lo = (halves[2 * i] & loMask) >>> 0;
    let hi = (halves[2 * i + 1] & hiMask) >>> 0;
    let left = bits;
    while (left > 0) {
      const shift = at & 7;
      const take = Math.min(8 - shift, left);
      out[at >> 3] |= (lo & ((1 << take) - 1)) << shift;
      lo = ((lo >>> take) | (hi << (32 - take))) >>> 0; // take <= 8: both shifts in range
      hi >>>= take;
      at += take;
      left -= take;
    }
  }
  return out;
}

/**
 * Inverse of packBits: `count` values of `bits` bits from `data` (the caller checked its length).
 * @param {Uint8Array} data
 * @param {number} count
 * @param {number} bits
 * @returns {BigUint64Array}
 */
export function unpackBits(data, count, bits) {
  const out = new BigUint64Array(count);
  const mask = (1n << BigInt(bits)) - 1n;
  const width = BigInt(bits);
  let acc = 0n;
  let held = 0n;
  let at = 0;
  for (let i = 0; i < count; i++) {
    while (held < width) {
      let word = 0;
      for (let b = 3; b >= 0; b--) word = word * 256 + (at + b < data.length ? data[at + b] : 0);
      acc |= BigInt(word) << held;
      held += 32n;
      at += 4;
    }
    out[i] = acc & mask;
    acc >>= width;
    held -= width;
  }
  return out;
}

// -- seed expansion --------------------------------------------------

export const SEED_BYTES = 32;
export const PUBLIC_A_TAG = enc.encode('heinfer/public-key/a/v1');
export const BATCH_A_TAG = enc.encode('heinfer/coeff-batch/a/v1');
export const GALOIS_A_TAG = enc.encode('heinfer/galois-key/a/v1');

/** @param {bigint} q */
function bitLength(q) {
  return q.toString(2).length;
}

/**
 * Polynomial `index` modulo prime number `prime` (its position j), uniform below q, from a public
 * seed: SHAKE-128(tag || seed || u32le(index) || u8(j)) read as little-endian uint64 words masked
 * to q's bit length, keeping the first N below q (Python: heinfer.he.backend.expand_uniform).
 * @param {Uint8Array} seed 32 bytes
 * @param {bigint} q
 * @param {number} prime position of q in the modulus chain
 * @param {number} index
 * @param {number} degree N
 * @param {Uint8Array} tag
 * @returns {BigUint64Array}
 */
export function expandUniform(seed, q, prime, index, degree, tag = BATCH_A_TAG) {
  if (seed.length !== SEED_BYTES) throw new Error(`seed must be ${SEED_BYTES} bytes`);
  const key = new Uint8Array(tag.length + SEED_BYTES + 5);
  key.set(tag);
  key.set(seed, tag.length);
  new DataView(key.buffer).setUint32(tag.length + SEED_BYTES, index, true);
  key[key.length - 1] = prime;
  const mask = (1n << BigInt(bitLength(q))) - 1n;
  let words = degree;
  for (;;) {
    const stream = shake128(key, 8 * words);
    const view = new DataView(stream.buffer);
    const out = new BigUint64Array(degree);
    let kept = 0;
    for (let i = 0; i < words && kept < degree; i++) {
      const value = view.getBigUint64(8 * i, true) & mask;
      if (value < q) out[kept++] = value;
      else if (words === degree) break; // a rejection: redraw with headroom, as Python does
    }
    if (kept === degree) return out;
    words *= 2;
  }
}

// -- parameter fingerprints --------------------------------------------------------------------

/**
 * The 32 bytes naming a BFV parameter set (Python: BFVParameters.fingerprint, the SHA-256 of
 * the canonical JSON ["bfv", N, [q...], t]).
 * @param {{poly_modulus_degree: number, coeff_modulus: string[], plain_modulus: string}} scheme
 * @returns {Uint8Array}
 */
export function bfvFingerprint(scheme) {
  const primes = scheme.coeff_modulus.map((q) => BigInt(q).toString()).join(',');
  const text = `["bfv",${scheme.poly_modulus_degree},[${primes}],${BigInt(scheme.plain_modulus)}]`;
  return sha256(enc.encode(text));
}

/**
 * The 8-byte CKKS parameter tag in every HNC1 envelope (Python: CkksParameters.fingerprint).
 * @param {{poly_modulus_degree: number, coeff_modulus: string[]}} params
 * @returns {Uint8Array}
 */
export function ckksFingerprint(params) {
  const primes = params.coeff_modulus.map((q) => BigInt(q).toString()).join(',');
  return sha256(enc.encode(`ckks:${params.poly_modulus_degree}:${primes}`)).slice(0, 8);
}

/**
 * The 32 bytes a network's key upload carries (Python: network_key_fingerprint).
 * @param {{poly_modulus_degree: number, coeff_modulus: string[]}} params
 * @returns {Uint8Array}
 */
export function networkKeyFingerprint(params) {
  const prefix = enc.encode('heinfer-ckks-keys:');
  return sha256(concat([prefix, ckksFingerprint(params)]));
}

// -- frames ------------------------------------------------------------------------------------

/**
 * @param {Uint8Array[]} parts
 * @returns {Uint8Array}
 */
export function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** @param {...number} values @returns {Uint8Array} */
function u32le(...values) {
  const out = new Uint8Array(4 * values.length);
  const view = new DataView(out.buffer);
  values.forEach((v, i) => view.setUint32(4 * i, v, true));
  return out;
}

/**
 * A body of length-prefixed records behind a 4-byte magic and a count (HEQ1 linear requests,
 * HNQ1 network requests; Python: wire.encode_request, network.encode_frames).
 * @param {string} magic
 * @param {Uint8Array[]} records
 * @returns {Uint8Array}
 */
export function encodeFrames(magic, records) {
  const parts = [enc.encode(magic), u32le(records.length)];
  for (const record of records) parts.push(u32le(record.length), record);
  return concat(parts);
}

/**
 * The records of a length-prefixed body (HNR1 network responses), every length checked.
 * @param {string} magic
 * @param {Uint8Array} body
 * @param {number} maxRecordBytes
 * @returns {Uint8Array[]}
 */
export function decodeFrames(magic, body, maxRecordBytes) {
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  checkMagic(body, magic);
  const count = view.getUint32(4, true);
  const out = [];
  let at = 8;
  for (let i = 0; i < count; i++) {
    if (at + 4 > body.length) throw new Error(`response truncated before record ${i}`);
    const length = view.getUint32(at, true);
    at += 4;
    if (length > maxRecordBytes || at + length > body.length) {
      throw new Error(`response record ${i} is truncated or too large`);
    }
    out.push(body.subarray(at, at + length));
    at += length;
  }
  if (at !== body.length) throw new Error('unexpected bytes after the last record');
  return out;
}

/**
 * Fixed-size result records behind HER1 and a count (linear responses; Python:
 * wire.decode_response).
 * @param {Uint8Array} body
 * @param {number} recordBytes
 * @returns {Uint8Array[]}
 */
export function decodeFixedRecords(body, recordBytes) {
  checkMagic(body, 'HER1');
  const count = new DataView(body.buffer, body.byteOffset, body.byteLength).getUint32(4, true);
  if (body.length !== 8 + count * recordBytes) {
    throw new Error(`response has ${body.length} bytes; ${count} records of ${recordBytes} expected`);
  }
  return Array.from({ length: count }, (_, i) => body.subarray(8 + i * recordBytes, 8 + (i + 1) * recordBytes));
}

/** @param {Uint8Array} body @param {string} magic */
function checkMagic(body, magic) {
  if (body.length < 8 || new TextDecoder().decode(body.subarray(0, 4)) !== magic) {
    throw new Error(`payload does not start with ${magic}`);
  }
}

export const KEY_KINDS = { public: 1, relin: 2, galois: 3 };

/**
 * A key upload (HEK1): the 32-byte parameter fingerprint, then each public part by kind
 * (Python: wire.encode_keys).
 * @param {Uint8Array} fingerprint
 * @param {Array<[keyof typeof KEY_KINDS, Uint8Array]>} parts
 * @returns {Uint8Array}
 */
export function encodeKeys(fingerprint, parts) {
  const out = [enc.encode('HEK1'), fingerprint, Uint8Array.of(parts.length)];
  for (const [kind, blob] of parts) {
    const head = new Uint8Array(5);
    head[0] = KEY_KINDS[kind];
    new DataView(head.buffer).setUint32(1, blob.length, true);
    out.push(head, blob);
  }
  return concat(out);
}

// HNC1 envelope around every CKKS object (Python: CkksContext.wrap / unwrap).
export const ENVELOPE_KINDS = { ciphertext: 1, public: 2, relin: 3, galois: 4, secret: 5 };

/**
 * @param {number} kind
 * @param {Uint8Array} fingerprint 8 bytes
 * @param {Uint8Array} sealBytes
 * @returns {Uint8Array}
 */
export function wrapEnvelope(kind, fingerprint, sealBytes) {
  return concat([enc.encode('HNC1'), Uint8Array.of(1, kind), fingerprint, sealBytes]);
}

/**
 * The SEAL bytes inside an HNC1 envelope, after checking magic, kind and parameters.
 * @param {number} kind
 * @param {Uint8Array} fingerprint
 * @param {Uint8Array} data
 * @returns {Uint8Array}
 */
export function unwrapEnvelope(kind, fingerprint, data) {
  if (data.length < 14 + 16 || new TextDecoder().decode(data.subarray(0, 4)) !== 'HNC1') {
    throw new Error('not a heinfer CKKS object');
  }
  if (data[4] !== 1 || data[5] !== kind) throw new Error(`unexpected envelope version or kind ${data[5]}`);
  if (!data.subarray(6, 14).every((b, i) => b === fingerprint[i])) {
    throw new Error('object made for other encryption parameters than this model');
  }
  return data.subarray(14);
}

// -- SEAL serialization headers ----------------------------------------------------------------
//
// Every SEAL object starts with a 16-byte header: magic 0xA15E, header size 16, version major
// and minor, compression mode, reserved, total size (u64). SEAL loads only its own minor version
// and objects nest (a ciphertext holds a data array and, seeded, a PRNG seed, each behind its
// own header), so objects crossing between node-seal (SEAL 4.1) and the service's SEAL get every
// nested header's minor version rewritten. The layouts walked here are SEAL's documented ones.

export const SEAL_HEADER_BYTES = 16;
const CT_META_BYTES = 73; // parms_id 32, is_ntt_form 1, size, N, L, scale, correction 8 each

/**
 * @param {Uint8Array} data
 * @param {number} at
 * @returns {{minor: number, compression: number, size: number}}
 */
export function readSealHeader(data, at = 0) {
  const view = new DataView(data.buffer, data.byteOffset + at, SEAL_HEADER_BYTES);
  if (view.getUint16(0, true) !== 0xa15e || data[at + 2] !== 16 || data[at + 3] !== 4) {
    throw new Error('not a SEAL 4 object (bad header)');
  }
  return { minor: data[at + 4], compression: data[at + 5], size: Number(view.getBigUint64(8, true)) };
}

/**
 * Rewrite the minor version of the uncompressed SEAL object at `at` and of every object nested
 * in it, in place; `shape` says which SEAL layout it has. Returns the object's end.
 * @param {Uint8Array} data
 * @param {number} at
 * @param {'ciphertext' | 'plaintext' | 'kswitch'} shape
 * @param {number} minor
 * @returns {number}
 */
export function setSealVersion(data, at, shape, minor) {
  const header = readSealHeader(data, at);
  if (header.compression !== 0) throw new Error('compressed SEAL objects cannot be rewritten');
  const end = at + header.size;
  if (end > data.length) throw new Error('truncated SEAL object');
  data[at + 4] = minor;
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let offset = at + SEAL_HEADER_BYTES;
  if (shape === 'kswitch') {
    offset += 32; // parms_id
    const lists = Number(view.getBigUint64(offset, true));
    offset += 8;
    for (let i = 0; i < lists; i++) {
      const keys = Number(view.getBigUint64(offset, true));
      offset += 8;
      for (let k = 0; k < keys; k++) offset = setSealVersion(data, offset, 'ciphertext', minor);
    }
  } else {
    offset += shape === 'ciphertext' ? CT_META_BYTES : 48; // plaintext: parms_id, count, scale
    while (offset < end) {
      data[offset + 4] = minor; // a data array or a PRNG seed: flat, no further nesting
      offset += readSealHeader(data, offset).size;
    }
  }
  if (offset !== end) throw new Error('unexpected SEAL object layout');
  return end;
}

/**
 * `body` (the bytes after a header) as a whole uncompressed SEAL object of version 4.minor.
 * @param {Uint8Array} body
 * @param {number} minor
 * @returns {Uint8Array}
 */
export function sealObject(body, minor) {
  const out = new Uint8Array(SEAL_HEADER_BYTES + body.length);
  const view = new DataView(out.buffer);
  view.setUint16(0, 0xa15e, true);
  out[2] = 16;
  out[3] = 4;
  out[4] = minor;
  view.setBigUint64(8, BigInt(out.length), true);
  out.set(body, SEAL_HEADER_BYTES);
  return out;
}
