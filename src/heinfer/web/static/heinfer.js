// @ts-check
/**
 * heinfer's JavaScript client: the data owner's side of the protocol, in a browser or Node.
 *
 * It speaks exactly what the Python client (heinfer.Client) speaks: fetch the public manifest,
 * make keys, upload only public material (HEK1), encrypt (HEQ1 linear, HNQ1 CNN), POST to
 * /v2/models/{name}/infer, decrypt (HER1, HNR1). Key generation, encryption and decryption are
 * Microsoft SEAL's own, from node-seal's WebAssembly build; formats.js holds the few pieces
 * heinfer adds on top (seed expansion, bit packing, frames), each tested byte for byte against
 * the Python client. The secret key never leaves this module unless `secretBytes()` is called.
 */

import { decompress as zstdDecompress } from './vendor/fzstd.js';
import {
  GALOIS_A_TAG,
  PUBLIC_A_TAG,
  SEAL_HEADER_BYTES,
  SEED_BYTES,
  bfvFingerprint,
  ckksFingerprint,
  concat,
  decodeFixedRecords,
  decodeFrames,
  encodeFrames,
  encodeKeys,
  expandUniform,
  networkKeyFingerprint,
  packBits,
  readSealHeader,
  sealObject,
  setSealVersion,
  unpackBits,
  unwrapEnvelope,
  wrapEnvelope,
  ENVELOPE_KINDS,
} from './formats.js';

export * from './formats.js';

/**
 * The SEAL serialization minor version the service's SEAL (TenSEAL 0.3's, 4.3) reads and
 * writes; node-seal writes 4.1. tests/web/test_js_formats.py checks it against the Python
 * side's own (heinfer.he.backend._VERSION), so a TenSEAL upgrade that moves it fails a test.
 */
export const SERVICE_SEAL_MINOR = 3;
export const KEY_ID_HEADER = 'X-Heinfer-Key-Id';
const FINGERPRINT_TAG_BYTES = 8;
export const BATCH_LAYOUT = 'coeff-batch';
export const PACKED_LAYOUT = 'coeff-packed';
const BATCHING_PLAIN_MODULUS = 65537n; // prime, 1 mod 2N for N <= 32768
const BATCH_GROUP = 16; // SEAL's largest ciphertext size: polynomials per composed ciphertext
const CT_META_BYTES = 73;
const NONE = 0;

/** @typedef {any} Seal  node-seal's module (the raw embind API of node-seal 7) */
/** @typedef {Record<string, any>} Manifest  the service's public manifest, as JSON */

/**
 * Cryptographically random bytes (the OS CSPRNG via Web Crypto, in browsers and Node).
 * @param {number} n
 */
function randomBytes(n) {
  const out = new Uint8Array(n);
  globalThis.crypto.getRandomValues(out);
  return out;
}

/** @param {any} value @returns {Uint8Array} */
function bytes(value) {
  return value instanceof Uint8Array ? value : new Uint8Array(value);
}

/** @param {bigint} q */
function bitLength(q) {
  return q.toString(2).length;
}

/**
 * np.rint: round half to even, as the Python client quantizes.
 * @param {number} x
 */
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * A SEAL error's text: node-seal throws WebAssembly exceptions carrying C++ ones.
 * @param {Seal} S
 * @param {unknown} error
 */
export function sealMessage(S, error) {
  try {
    if (typeof S.getExceptionMessage === 'function' && !(error instanceof Error)) {
      return String(S.getExceptionMessage(error));
    }
  } catch {
    // not a C++ exception
  }
  return error instanceof Error ? error.message : String(error);
}

/**
 * The minor version node-seal writes (SEAL 4.1 -> 1): read from an empty plaintext.
 * @param {Seal} S
 */
function localMinor(S) {
  const plain = new S.Plaintext();
  const minor = readSealHeader(bytes(plain.saveToArray(S.ComprModeType.none))).minor;
  plain.delete();
  return minor;
}

/**
 * @param {Seal} S
 * @param {any} schemeType
 * @param {number} degree
 * @param {bigint[]} primes
 * @param {bigint | null} plainModulus
 * @param {any} [securityLevel] SEAL's check (default 128 bits; arithmetic-only twins pass none)
 * @param {boolean} [chain] build every level (arithmetic-only twins need the first only)
 */
function sealContext(S, schemeType, degree, primes, plainModulus, securityLevel = S.SecLevelType.tc128, chain = true) {
  const parms = new S.EncryptionParameters(schemeType);
  parms.setPolyModulusDegree(degree);
  const moduli = new S.VectorModulus();
  for (const q of primes) moduli.push_back(new S.Modulus(q));
  parms.setCoeffModulus(moduli);
  if (plainModulus !== null) parms.setPlainModulus(new S.Modulus(plainModulus));
  const context = new S.SEALContext(parms, chain, securityLevel);
  if (!context.parametersSet()) throw new Error('SEAL rejects these encryption parameters');
  return context;
}

/**
 * (size, L, N) coefficient arrays of an uncompressed ciphertext-shaped SEAL object (ciphertext,
 * public key): metadata, then one data array (Python: backend.payload_arrays).
 * @param {Uint8Array} data
 * @returns {BigUint64Array[][]} [component][prime] -> N coefficients
 */
function ciphertextArrays(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const meta = SEAL_HEADER_BYTES;
  const size = Number(view.getBigUint64(meta + 33, true));
  const degree = Number(view.getBigUint64(meta + 41, true));
  const levels = Number(view.getBigUint64(meta + 49, true));
  const start = meta + CT_META_BYTES + SEAL_HEADER_BYTES + 8;
  return polyArrays(data, start, size, levels, degree);
}

/**
 * @param {Uint8Array} data
 * @param {number} start
 * @param {number} size
 * @param {number} levels
 * @param {number} degree
 */
function polyArrays(data, start, size, levels, degree) {
  const copy = data.slice(start, start + 8 * size * levels * degree);
  const all = new BigUint64Array(copy.buffer);
  const out = [];
  for (let c = 0; c < size; c++) {
    const component = [];
    for (let j = 0; j < levels; j++) {
      component.push(all.subarray((c * levels + j) * degree, (c * levels + j + 1) * degree));
    }
    out.push(component);
  }
  return out;
}

/**
 * (L, N) values of an uncompressed plaintext or secret key (NTT form: one row per prime).
 * @param {Uint8Array} data
 * @param {number} degree
 */
function plaintextArrays(data, degree) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const count = Number(view.getBigUint64(SEAL_HEADER_BYTES + 32, true));
  const start = SEAL_HEADER_BYTES + 48 + SEAL_HEADER_BYTES + 8;
  return polyArrays(data, start, 1, Math.max(1, count / degree), Math.min(count, degree))[0];
}

/**
 * The (k0, a) pairs of an uncompressed SEAL KSwitchKeys object (Galois keys), in SEAL's order
 * (ascending Galois element, then decomposition prime): each [component][prime] -> N values
 * (Python: he.galois._component_arrays).
 * @param {Uint8Array} data
 * @returns {BigUint64Array[][][]}
 */
function kswitchKeyArrays(data) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let offset = SEAL_HEADER_BYTES + 32; // header, parms_id
  const lists = Number(view.getBigUint64(offset, true));
  offset += 8;
  const out = [];
  for (let i = 0; i < lists; i++) {
    const keys = Number(view.getBigUint64(offset, true));
    offset += 8;
    for (let k = 0; k < keys; k++) {
      const size = readSealHeader(data, offset).size;
      out.push(ciphertextArrays(data.subarray(offset, offset + size)));
      offset += size;
    }
  }
  return out;
}

/**
 * The rotation step SEAL's createGaloisKeysWithSteps turns into Galois element `element`
 * (3^step mod 2N, SEAL's generator); node-seal 7 takes steps, heinfer's manifests name elements.
 * @param {number} element
 * @param {number} degree N
 */
export function galoisStep(element, degree) {
  const m = 2 * degree;
  let power = 1;
  for (let step = 0; step < degree / 2; step++) {
    if (power === element) return step;
    power = (power * 3) % m;
  }
  throw new Error(`Galois element ${element} is not a power of 3 modulo ${m}: this client cannot make its key`);
}

// ================================================================================================
// Linear models: BFV, coefficient encoding (layouts coeff-rowpack, coeff-packed, coeff-batch)
// ================================================================================================

/** A promise that resolves in a later task (a message to itself: not throttled like timers). */
function nextTask() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => {
      channel.port1.close();
      resolve(undefined);
    };
    channel.port2.postMessage(null);
  });
}

/**
 * The automorphisms a coeff-packed client applies for the tree's client levels (Python:
 * Packing.image_elements): image b is x(X^e_b), e_b the product of the first client_levels
 * levels' elements 2N/S + 1 (stride S = stride / 2^k, coarsest first) whose bit is set in b,
 * modulo 2N; image 0 is x itself.
 * @param {{stride: number, client_levels?: number}} spec the manifest's layout.packed
 * @param {number} degree N
 * @returns {number[]}
 */
export function imageElements(spec, degree) {
  const m = 2 * degree;
  const clientLevels = Number(spec.client_levels ?? 0);
  const levelElements = Array.from({ length: clientLevels }, (_, k) => m / (Number(spec.stride) >> k) + 1);
  return Array.from({ length: 1 << clientLevels }, (_, b) =>
    levelElements.reduce((element, e, k) => ((b >> k) & 1 ? (element * e) % m : element), 1),
  );
}

/**
 * p(X) -> p(X^element) in Z[X]/(X^N + 1) for a plaintext's integer coefficients (element odd):
 * coefficient i moves to i*element mod 2N, negated at or above N (Python: packed.automorphism).
 * @param {Int32Array} coefficients at most N
 * @param {number} element
 * @param {number} degree N
 */
export function automorphism(coefficients, element, degree) {
  const out = new Int32Array(degree);
  coefficients.forEach((v, i) => {
    const target = (i * element) % (2 * degree);
    if (target >= degree) out[target - degree] = -v;
    else out[target] = v;
  });
  return out;
}

/**
 * Bytes of a compact result record: per result, c1 (N values) then c0 at its coefficients.
 * @param {Array<{coefficients: number[]}>} results
 * @param {number} degree
 * @param {number} bits
 */
function compactRecordBytes(results, degree, bits) {
  return results.reduce((n, r) => n + Math.ceil((degree * bits) / 8) + Math.ceil((r.coefficients.length * bits) / 8), 0);
}

/**
 * A 4-byte magic and a little-endian u32 count: the head of HEB1/HEP1 bodies.
 * @param {string} magic
 * @param {number} count
 */
function frameHead(magic, count) {
  const head = new Uint8Array(8);
  head.set(new TextEncoder().encode(magic));
  new DataView(head.buffer).setUint32(4, count, true);
  return head;
}

/** The client side of a linear model's layouts (Python: plans.linear.LinearCodec and its layouts). */
export class LinearCodec {
  /**
   * @param {Seal} S
   * @param {Manifest} manifest
   */
  constructor(S, manifest) {
    if (manifest.layout?.kind !== 'coeff-rowpack') throw new Error('not a coeff-rowpack manifest');
    this.S = S;
    this.manifest = manifest;
    const scheme = manifest.scheme;
    this.degree = Number(scheme.poly_modulus_degree);
    /** @type {bigint[]} */ this.primes = scheme.coeff_modulus.map(BigInt);
    this.dataPrimes = this.primes.slice(0, -1);
    this.plainModulus = BigInt(scheme.plain_modulus);
    this.context = sealContext(S, S.SchemeType.bfv, this.degree, this.primes, this.plainModulus);
    this.fingerprint = bfvFingerprint(scheme);
    this.minor = localMinor(S);
    this.results = manifest.layout.results;
    this.bits = Number(manifest.layout.result_prime_bits);
    this.scale = Number(manifest.layout.output_scale);
    this.recordBytes = compactRecordBytes(this.results, this.degree, this.bits);
    this.nFeatures = Number(manifest.input.shape[0]);
    this.nOutputs = Number(manifest.output.shape[0]);
    const batch = manifest.layout.batch;
    /** the coeff-batch layout's part of the manifest, when the model serves it */
    this.batch = batch?.kind === BATCH_LAYOUT ? batch : null;
    const packed = manifest.layout.packed;
    /** the coeff-packed layout's part of the manifest, when the model serves it */
    this.packed = packed?.kind === PACKED_LAYOUT ? packed : null;
    /** @type {number[]} Galois elements of coeff-packed's packing tree (ascending: SEAL's order) */
    this.galoisElements = (manifest.keys?.galois_elements ?? []).map(Number).sort((/** @type {number} */ a, /** @type {number} */ b) => a - b);
    this.packedRecordBytes = this.packed ? compactRecordBytes(this.packed.results, this.degree, Number(this.packed.result_prime_bits)) : 0;
    /** @type {any} */ this.secret = null;
    /** metadata of a one-prime ciphertext, from SEAL (set with the key) */
    this._lastMeta = new Uint8Array(0);
    /** metadata of a fresh ciphertext at the data level, from SEAL (set with the key) */
    this._dataMeta = new Uint8Array(0);
    /** @type {{twin: any, parmsId: Uint8Array} | null} SEAL context for key-level arithmetic */
    this._twin = null;
  }

  /** A fresh secret key, kept inside SEAL's memory in this page. */
  keygen() {
    const S = this.S;
    this.keygenerator = new S.KeyGenerator(this.context);
    this.secret = this.keygenerator.secretKey();
    this._ready();
  }

  _ready() {
    const S = this.S;
    const pk = this.keygenerator.createPublicKey();
    this.encryptor = new S.Encryptor(this.context, pk, this.secret);
    this.decryptor = new S.Decryptor(this.context, this.secret);
    pk.delete();
    // Metadata of a one-prime ciphertext: results are decrypted at the last level.
    const plain = this._plaintext(new Int32Array(0));
    const ct = new S.Ciphertext();
    this.encryptor.encryptSymmetric(plain, ct);
    const fresh = bytes(ct.saveToArray(S.ComprModeType.none));
    this._dataMeta = fresh.slice(SEAL_HEADER_BYTES, SEAL_HEADER_BYTES + CT_META_BYTES);
    const evaluator = new S.Evaluator(this.context);
    evaluator.cipherModSwitchToInplace(ct, this.context.lastParmsId());
    evaluator.delete();
    const saved = bytes(ct.saveToArray(S.ComprModeType.none));
    this._lastMeta = saved.slice(SEAL_HEADER_BYTES, SEAL_HEADER_BYTES + CT_META_BYTES);
    ct.delete();
    plain.delete();
  }

  /** The secret key as SEAL bytes (only for keeping it in this browser's IndexedDB). */
  secretBytes() {
    return bytes(this.secret.saveToArray(this.S.ComprModeType.none));
  }

  /** @param {Uint8Array} data SEAL bytes from secretBytes() */
  loadSecret(data) {
    const S = this.S;
    this.secret = new S.SecretKey();
    this.secret.loadFromArray(this.context, data);
    this.keygenerator = new S.KeyGenerator(this.context, this.secret);
    this._ready();
  }

  /**
   * The public key upload part: a fresh 32-byte seed of its uniform half plus the other half
   * bit-packed (Python: SecretKey.public_key_bytes). SEAL makes pk = (-(a*s + e), a); a is
   * replaced by a' expanded from the seed and pk0 corrected to -(a'*s + e), the same error.
   */
  publicKeyBytes() {
    const S = this.S;
    const pk = this.keygenerator.createPublicKey();
    const [pk0, a] = ciphertextArrays(bytes(pk.saveToArray(S.ComprModeType.none)));
    pk.delete();
    return this._seeded([[pk0, a]], PUBLIC_A_TAG);
  }

  /**
   * coeff-packed's Galois keys part: SEAL's Galois keys for the manifest's elements, travelling
   * as the public key does (one seed for every uniform half, tag heinfer/galois-key/a/v1, then
   * every corrected k0 bit-packed per key-level prime; Python: he.galois.make_galois_keys).
   *
   * node-seal 7 makes Galois keys from rotation steps only, and SEAL turns steps into elements
   * only for parameters that support batching (t prime, 1 mod 2N), which heinfer's t = 2^k is
   * not. Key-switching keys do not involve t, so SEAL makes them under a twin context with the
   * same N and primes and t = 65537 (prime, 1 mod 2N for every N SEAL allows), for this same
   * secret key: its bytes relabelled with the twin's key-level parms_id (the NTT-form
   * coefficients are the same numbers). Only the (k0, a) pairs are taken from the result.
   */
  galoisKeyBytes() {
    if (!this.galoisElements.length) return randomBytes(SEED_BYTES); // tree on the client: a seed of no keys, as Python sends
    const S = this.S;
    const steps = Int32Array.from(this.galoisElements, (e) => galoisStep(e, this.degree));
    const twin = sealContext(S, S.SchemeType.bfv, this.degree, this.primes, BATCHING_PLAIN_MODULUS, undefined, false);
    const throwaway = new S.KeyGenerator(twin);
    const other = throwaway.secretKey();
    const relabelled = this.secretBytes().slice();
    relabelled.set(bytes(other.saveToArray(S.ComprModeType.none)).subarray(SEAL_HEADER_BYTES, SEAL_HEADER_BYTES + 32), SEAL_HEADER_BYTES);
    other.delete();
    throwaway.delete();
    const secret = new S.SecretKey();
    let saved = new Uint8Array(0);
    /** @type {number[]} */ let missing = [];
    try {
      secret.loadFromArray(twin, relabelled);
      const generator = new S.KeyGenerator(twin, secret);
      const keys = generator.createGaloisKeysWithSteps(steps);
      saved = bytes(keys.saveToArray(S.ComprModeType.none)).slice();
      missing = this.galoisElements.filter((e) => !keys.hasKey(e));
      keys.delete();
      generator.delete();
    } finally {
      relabelled.fill(0);
      secret.delete();
      twin.delete();
    }
    if (missing.length) throw new Error(`SEAL made no Galois key for elements ${missing}`);
    const pairs = kswitchKeyArrays(saved);
    if (pairs.length !== this.galoisElements.length * this.dataPrimes.length) throw new Error('unexpected Galois key layout');
    return this._seeded(pairs, GALOIS_A_TAG);
  }

  /**
   * RLWE pairs (k0, a) in NTT form at the key level, re-seeded: a fresh seed, then for pair i
   * k0 + (a - a_i)*s per prime, bit-packed, where a_i is expanded from the seed (index i).
   * @param {BigUint64Array[][][]} pairs [pair][component][prime]
   * @param {Uint8Array} tag
   */
  _seeded(pairs, tag) {
    const seed = randomBytes(SEED_BYTES);
    const fresh = pairs.map((_, index) => this.primes.map((q, j) => expandUniform(seed, q, j, index, this.degree, tag)));
    /** @type {Uint8Array[]} */ const parts = [seed];
    this._moveUniformHalves(pairs, fresh).forEach((k0) => {
      this.primes.forEach((q, j) => parts.push(packBits(k0[j], bitLength(q))));
    });
    return concat(parts);
  }

  /**
   * k0 + (a - a')*s for RLWE pairs (k0, a) in NTT form at the key level and new uniform halves
   * a' (Python: rlwe.encrypt.replace_uniform_half): the pair's message and error with a' as its
   * uniform half. SEAL does the arithmetic, in a twin CKKS context (every ciphertext in NTT
   * form) whose coefficient modulus is the key level's primes plus one more prime, so that its
   * data level is exactly the key level: sub, multiply_plain by the secret key's NTT form, add,
   * on ciphertexts composed from the polynomials, up to 16 pairs per ciphertext.
   * @param {BigUint64Array[][][]} pairs [pair][component][prime]
   * @param {BigUint64Array[][]} fresh [pair][prime]
   * @returns {BigUint64Array[][]} [pair][prime] the corrected k0
   */
  _moveUniformHalves(pairs, fresh) {
    const S = this.S;
    const n = this.degree;
    const levels = this.primes.length;
    const { twin, parmsId } = this._keyLevelTwin();
    const meta = new Uint8Array(CT_META_BYTES);
    const view = new DataView(meta.buffer);
    meta.set(parmsId);
    meta[32] = 1; // NTT form
    view.setBigUint64(41, BigInt(n), true);
    view.setBigUint64(49, BigInt(levels), true);
    view.setFloat64(57, 1.0, true);
    view.setBigUint64(65, 1n, true);
    const secret = this.secretBytes();
    const sBytes = secret.slice(SEAL_HEADER_BYTES + 48 + SEAL_HEADER_BYTES + 8, SEAL_HEADER_BYTES + 48 + SEAL_HEADER_BYTES + 8 + 8 * n * levels);
    secret.fill(0);
    const plainMeta = new Uint8Array(48);
    plainMeta.set(parmsId);
    new DataView(plainMeta.buffer).setBigUint64(32, BigInt(n * levels), true);
    new DataView(plainMeta.buffer).setFloat64(40, 1.0, true);
    const count = new Uint8Array(8);
    new DataView(count.buffer).setBigUint64(0, BigInt(n * levels), true);
    const sNtt = new S.Plaintext();
    const evaluator = new S.Evaluator(twin);
    /** @type {BigUint64Array[][]} */ const out = [];
    /** @param {Uint8Array[]} polys */
    const composed = (polys) => {
      const head = meta.slice();
      new DataView(head.buffer).setBigUint64(33, BigInt(polys.length), true);
      const words = new Uint8Array(8);
      new DataView(words.buffer).setBigUint64(0, BigInt(polys.length * n * levels), true);
      const ct = new S.Ciphertext();
      ct.loadFromArray(twin, sealObject(concat([head, sealObject(concat([words, ...polys]), this.minor)]), this.minor));
      return ct;
    };
    /** @param {BigUint64Array[]} rows */
    const poly = (rows) => concat(rows.map((row) => new Uint8Array(row.buffer, row.byteOffset, 8 * n)));
    try {
      sNtt.loadFromArray(twin, sealObject(concat([plainMeta, sealObject(concat([count, sBytes]), this.minor)]), this.minor));
      for (let first = 0; first < pairs.length; first += BATCH_GROUP) {
        const group = pairs.slice(first, first + BATCH_GROUP);
        const news = fresh.slice(first, first + BATCH_GROUP);
        const k0s = group.map(([k0]) => poly(k0));
        const olds = group.map(([, a]) => poly(a));
        const seeded = news.map(poly);
        // SEAL refuses single-component ciphertexts and results whose c1.. are all zero
        for (const parts of [k0s, olds, seeded]) if (parts.length === 1) parts.push(parts[0]);
        const difference = composed(olds);
        const seededHalf = composed(seeded);
        const first0 = composed(k0s);
        evaluator.subInplace(difference, seededHalf); // a - a'
        evaluator.multiplyPlainInplace(difference, sNtt); // (a - a') * s
        evaluator.addInplace(difference, first0); // k0 + (a - a') * s
        const result = ciphertextArrays(bytes(difference.saveToArray(S.ComprModeType.none)));
        for (const ct of [difference, seededHalf, first0]) ct.delete();
        group.forEach((_, k) => out.push(result[k].map((row) => row.slice())));
      }
    } finally {
      sBytes.fill(0);
      sNtt.delete();
      evaluator.delete();
    }
    return out;
  }

  /**
   * The twin CKKS context of _moveUniformHalves (made once per codec: SEAL takes ~0.1 s to
   * make a context in WebAssembly): the key level's primes plus one more 60-bit prime, first
   * level only, and that level's parms_id bytes.
   * @returns {{twin: any, parmsId: Uint8Array}}
   */
  _keyLevelTwin() {
    if (!this._twin) {
      const S = this.S;
      const n = this.degree;
      const candidates = S.CoeffModulus.Create(n, Int32Array.from({ length: this.primes.length + 1 }, () => 60));
      let extra = 0n;
      for (let i = 0; i < candidates.size(); i++) {
        const q = /** @type {any} */ (candidates.get(i)).value();
        if (!this.primes.includes(q)) extra = q;
      }
      candidates.delete();
      const twin = sealContext(S, S.SchemeType.ckks, n, [...this.primes, extra], null, S.SecLevelType.none, false);
      const dataLevel = twin.firstParmsId();
      const parmsId = new Uint8Array(new BigUint64Array(Array.from(dataLevel.values(), BigInt)).buffer);
      dataLevel.delete();
      this._twin = { twin, parmsId };
    }
    return this._twin;
  }

  /** @param {ArrayLike<number>} x features in the manifest's input range */
  quantize(x) {
    const spec = this.manifest.input;
    const levels = 2 ** Number(spec.bits) - 1;
    const out = new Int32Array(x.length);
    for (let i = 0; i < x.length; i++) {
      const scaled = roundHalfEven(((x[i] - spec.low) / (spec.high - spec.low)) * levels);
      out[i] = Math.min(levels, Math.max(0, scaled));
    }
    return out;
  }

  /** @param {Int32Array} coefficients */
  _plaintext(coefficients) {
    const S = this.S;
    const n = this.degree;
    const values = new BigUint64Array(n);
    coefficients.forEach((c, i) => {
      values[i] = ((BigInt(c) % this.plainModulus) + this.plainModulus) % this.plainModulus;
    });
    const dyn = new Uint8Array(8 + 8 * n);
    new DataView(dyn.buffer).setBigUint64(0, BigInt(n), true);
    dyn.set(new Uint8Array(values.buffer), 8);
    const meta = new Uint8Array(48);
    const view = new DataView(meta.buffer);
    view.setBigUint64(32, BigInt(n), true);
    view.setFloat64(40, 1.0, true);
    const plain = new S.Plaintext();
    plain.loadFromArray(this.context, sealObject(concat([meta, sealObject(dyn, this.minor)]), this.minor));
    return plain;
  }

  /**
   * One request record: a seeded symmetric SEAL ciphertext of x at coefficients 0..n-1, sent as
   * parameter tag + c0 bit-packed per prime + SEAL's seed (Python: Context.compact_request).
   * @param {ArrayLike<number>} x
   */
  encrypt(x) {
    if (x.length !== this.nFeatures) throw new Error(`expected ${this.nFeatures} features`);
    return this._encryptCoefficients(this.quantize(x));
  }

  /**
   * One compact record (as encrypt) of the plaintext polynomial with these coefficients.
   * @param {Int32Array} coefficients
   */
  _encryptCoefficients(coefficients) {
    const S = this.S;
    const plain = this._plaintext(coefficients);
    const serializable = this.encryptor.encryptSymmetricSerializable(plain);
    const saved = bytes(serializable.saveToArray(S.ComprModeType.none));
    serializable.delete();
    plain.delete();
    const view = new DataView(saved.buffer, saved.byteOffset, saved.byteLength);
    const arrayAt = SEAL_HEADER_BYTES + CT_META_BYTES;
    const count = Number(view.getBigUint64(arrayAt + SEAL_HEADER_BYTES, true));
    const levels = this.dataPrimes.length;
    if (count !== this.degree * levels) throw new Error('unexpected seeded ciphertext layout');
    const [c0] = polyArrays(saved, arrayAt + SEAL_HEADER_BYTES + 8, 1, levels, this.degree);
    const seed = saved.slice(arrayAt + readSealHeader(saved, arrayAt).size);
    seed[4] = SERVICE_SEAL_MINOR; // the PRNG seed object's own header
    return concat([
      this.fingerprint.subarray(0, FINGERPRINT_TAG_BYTES),
      ...this.dataPrimes.map((q, j) => packBits(c0[j], bitLength(q))),
      seed,
    ]);
  }

  /**
   * Scores from one result record: per group of rows, c1 (N coefficients) then c0 at the output
   * coefficients, modulo the last prime; decrypted by SEAL as a one-prime ciphertext.
   * @param {Uint8Array} record
   */
  decrypt(record) {
    return this._decryptCompact(record, this.results, this.bits, this.scale, this.recordBytes);
  }

  /**
   * A compact result record (Python: codec.decrypt_compact): per result, c1 then c0 at its
   * output coefficients, bit-packed at `bits`; output outputs[i] is coefficient
   * coefficients[i] / divisor.
   * @param {Uint8Array} record
   * @param {Array<{outputs: number[], coefficients: number[]}>} results
   * @param {number} bits
   * @param {number} divisor
   * @param {number} expected the record's size
   */
  _decryptCompact(record, results, bits, divisor, expected) {
    if (record.length !== expected) {
      throw new Error(`result record is ${record.length} bytes, ${expected} expected`);
    }
    const n = this.degree;
    const scores = new Float64Array(this.nOutputs);
    let offset = 0;
    for (const result of results) {
      const coefficients = result.coefficients;
      const c1Size = Math.ceil((n * bits) / 8);
      const c0Size = Math.ceil((coefficients.length * bits) / 8);
      const c1 = unpackBits(record.subarray(offset, offset + c1Size), n, bits);
      const c0Out = unpackBits(record.subarray(offset + c1Size, offset + c1Size + c0Size), coefficients.length, bits);
      offset += c1Size + c0Size;
      const c0 = new BigUint64Array(n);
      coefficients.forEach((/** @type {number} */ k, /** @type {number} */ i) => {
        c0[k] = c0Out[i];
      });
      const values = this._decryptLastLevel(c0, c1);
      result.outputs.forEach((row, i) => {
        scores[row] = values[coefficients[i]] / divisor;
      });
    }
    return scores;
  }

  /**
   * SEAL's decryption of the one-prime ciphertext (c0, c1) modulo the first prime, composed from
   * the one-prime metadata SEAL wrote; its N plaintext coefficients, centered modulo t.
   * @param {BigUint64Array} c0
   * @param {BigUint64Array} c1
   * @returns {Float64Array}
   */
  _decryptLastLevel(c0, c1) {
    const S = this.S;
    const n = this.degree;
    const q1 = this.primes[0];
    const t = this.plainModulus;
    if (c1.some((v) => v >= q1) || c0.some((v) => v >= q1)) throw new Error('result coefficient out of range');
    const dyn = new Uint8Array(8 + 16 * n);
    new DataView(dyn.buffer).setBigUint64(0, BigInt(2 * n), true);
    dyn.set(new Uint8Array(c0.buffer, c0.byteOffset, 8 * n), 8);
    dyn.set(new Uint8Array(c1.buffer, c1.byteOffset, 8 * n), 8 + 8 * n);
    const ct = new S.Ciphertext();
    const plain = new S.Plaintext();
    try {
      ct.loadFromArray(this.context, sealObject(concat([this._lastMeta, sealObject(dyn, this.minor)]), this.minor));
      this.decryptor.decrypt(ct, plain);
      const saved = bytes(plain.saveToArray(S.ComprModeType.none));
      const count = Number(new DataView(saved.buffer).getBigUint64(SEAL_HEADER_BYTES + 32, true));
      const values = polyArrays(saved, SEAL_HEADER_BYTES + 48 + SEAL_HEADER_BYTES + 8, 1, 1, count)[0][0];
      const out = new Float64Array(n); // SEAL drops trailing zero coefficients
      values.forEach((v, k) => {
        out[k] = Number(v >= (t + 1n) / 2n ? v - t : v);
      });
      return out;
    } finally {
      ct.delete();
      plain.delete();
    }
  }

  /** @param {ArrayLike<number>[]} X */
  encryptRequest(X) {
    return encodeFrames('HEQ1', X.map((x) => this.encrypt(x)));
  }

  /** @param {Uint8Array} body */
  decryptResponse(body) {
    return decodeFixedRecords(body, this.recordBytes).map((r) => this.decrypt(r));
  }

  // -- coeff-batch: one ciphertext per feature, sample b at coefficient b --------------------

  /** Most samples one coeff-batch request holds (the ring degree N). */
  get batchCapacity() {
    return this.batch ? Number(this.batch.max_samples) : 0;
  }

  /**
   * A coeff-batch request (HEB1): for up to N samples, ciphertext i encrypts
   * sum_b x_int[b, i] X^b with c1 expanded from one public seed (formats.expandUniform) and
   * c0 = -(c1*s + e) + round(q*m/t), sent as parameter tag + seed + every c0 bit-packed prime
   * by prime (Python: BatchClient.encrypt, SecretKey.encrypt_columns).
   *
   * SEAL does all the modular arithmetic. It encrypts m symmetrically, (c0', a') =
   * (-(a'*s + e) + round(q*m/t), a'), for a uniform a' of its own; then, on ciphertexts composed
   * from those polynomials, c0 = c0' + (a' - a)*s (sub, NTT, multiply_plain by the secret key's
   * NTT form, inverse NTT, add) = -(a*s + e) + round(q*m/t): the same message and error with
   * the seed's a as the uniform half. Up to 16 features ride in one composed ciphertext (SEAL's
   * largest ciphertext size), one polynomial per component.
   * @param {ArrayLike<number>[]} X samples in the manifest's input range
   * @param {(done: number, total: number) => void} [progress]
   * @param {number} [group] polynomials per composed ciphertext, 2..16 (tests pick one that
   *   leaves a lone last feature)
   */
  encryptBatch(X, progress, group = BATCH_GROUP) {
    const steps = this._batchSteps(X, group);
    for (;;) {
      const step = steps.next();
      if (step.done) return step.value;
      progress?.(...step.value);
    }
  }

  /**
   * encryptBatch's bytes, handing the page back its event loop after every composed
   * ciphertext (hundreds of SEAL encryptions would otherwise freeze it for seconds).
   * @param {ArrayLike<number>[]} X
   * @param {(done: number, total: number) => void} [progress]
   * @param {number} [group]
   */
  async encryptBatchAsync(X, progress, group = BATCH_GROUP) {
    const steps = this._batchSteps(X, group);
    for (;;) {
      const step = steps.next();
      if (step.done) return step.value;
      progress?.(...step.value);
      await nextTask();
    }
  }

  /**
   * The work of encryptBatch, one composed ciphertext per step; yields (features done, total).
   * @param {ArrayLike<number>[]} X
   * @param {number} group
   * @returns {Generator<[number, number], Uint8Array, void>}
   */
  *_batchSteps(X, group) {
    if (!this.batch) throw new Error('this model does not serve the coeff-batch layout');
    if (X.length < 1 || X.length > this.batchCapacity) {
      throw new Error(`a coeff-batch request holds 1..${this.batchCapacity} samples, got ${X.length}`);
    }
    if (Number(this.batch.ciphertexts) !== this.nFeatures) throw new Error('unexpected coeff-batch manifest');
    if (!(group >= 2 && group <= BATCH_GROUP)) throw new Error(`group must be 2..${BATCH_GROUP}`);
    const S = this.S;
    const n = this.degree;
    const levels = this.dataPrimes.length;
    const polyBytes = 8 * n * levels; // one polynomial, all data primes, as SEAL stores it
    const columns = Array.from({ length: this.nFeatures }, () => new Int32Array(X.length));
    X.forEach((x, b) => {
      if (x.length !== this.nFeatures) throw new Error(`expected ${this.nFeatures} features per sample`);
      this.quantize(x).forEach((v, i) => {
        columns[i][b] = v;
      });
    });
    const seed = randomBytes(SEED_BYTES);
    const limbBytes = this.dataPrimes.map((q) => (n * bitLength(q)) / 8); // N is a multiple of 8
    const out = new Uint8Array(FINGERPRINT_TAG_BYTES + SEED_BYTES + this.nFeatures * limbBytes.reduce((a, b) => a + b));
    out.set(this.fingerprint.subarray(0, FINGERPRINT_TAG_BYTES));
    out.set(seed, FINGERPRINT_TAG_BYTES);
    const limbStarts = limbBytes.map(
      (_, j) => FINGERPRINT_TAG_BYTES + SEED_BYTES + this.nFeatures * limbBytes.slice(0, j).reduce((a, b) => a + b, 0),
    );
    const evaluator = new S.Evaluator(this.context);
    const secretNtt = this._secretAtDataLevel();
    const fresh = new S.Ciphertext();
    try {
      for (let first = 0; first < this.nFeatures; first += group) {
        const features = Array.from({ length: Math.min(group, this.nFeatures - first) }, (_, k) => first + k);
        const sealC0 = [];
        const sealA = [];
        const seedA = [];
        for (const i of features) {
          const plain = this._plaintext(columns[i]);
          this.encryptor.encryptSymmetric(plain, fresh);
          plain.delete();
          const saved = bytes(fresh.saveToArray(S.ComprModeType.none));
          const data = SEAL_HEADER_BYTES + CT_META_BYTES + SEAL_HEADER_BYTES + 8;
          sealC0.push(saved.slice(data, data + polyBytes));
          sealA.push(saved.slice(data + polyBytes, data + 2 * polyBytes));
          const a = new Uint8Array(polyBytes);
          this.dataPrimes.forEach((q, j) => {
            const row = expandUniform(seed, q, j, i, n);
            a.set(new Uint8Array(row.buffer), 8 * n * j);
          });
          seedA.push(a);
        }
        // SEAL refuses a ciphertext of one component and results whose c1.. are all zero
        // ("transparent"): a lone last feature rides twice.
        for (const parts of [sealC0, sealA, seedA]) if (parts.length === 1) parts.push(parts[0]);
        const difference = this._composed(sealA);
        const seedHalf = this._composed(seedA);
        const sealFirst = this._composed(sealC0);
        evaluator.subInplace(difference, seedHalf); // a' - a
        evaluator.cipherTransformToNttInplace(difference);
        evaluator.multiplyPlainInplace(difference, secretNtt); // (a' - a) * s
        evaluator.cipherTransformFromNttInplace(difference);
        evaluator.addInplace(difference, sealFirst); // c0' + (a' - a) * s
        const result = bytes(difference.saveToArray(S.ComprModeType.none));
        for (const ct of [difference, seedHalf, sealFirst]) ct.delete();
        const c0s = ciphertextArrays(result);
        features.forEach((i, k) => {
          this.dataPrimes.forEach((q, j) => {
            out.set(packBits(c0s[k][j], bitLength(q)), limbStarts[j] + i * limbBytes[j]);
          });
        });
        yield [first + features.length, this.nFeatures];
      }
    } finally {
      fresh.delete();
      secretNtt.delete();
      evaluator.delete();
    }
    return concat([frameHead('HEB1', X.length), out]);
  }

  /**
   * The secret key's NTT form at the data level (its rows for the data primes), as an NTT-form
   * SEAL plaintext for multiply_plain. Stays inside SEAL's memory in this page.
   */
  _secretAtDataLevel() {
    const S = this.S;
    const n = this.degree;
    const levels = this.dataPrimes.length;
    const secret = this.secretBytes();
    const start = SEAL_HEADER_BYTES + 48 + SEAL_HEADER_BYTES + 8;
    const meta = new Uint8Array(48);
    meta.set(this._dataMeta.subarray(0, 32)); // parms_id of the data level
    const view = new DataView(meta.buffer);
    view.setBigUint64(32, BigInt(n * levels), true);
    view.setFloat64(40, 1.0, true);
    const dyn = new Uint8Array(8 + 8 * n * levels);
    new DataView(dyn.buffer).setBigUint64(0, BigInt(n * levels), true);
    dyn.set(secret.subarray(start, start + 8 * n * levels), 8);
    const plain = new S.Plaintext();
    try {
      plain.loadFromArray(this.context, sealObject(concat([meta, sealObject(dyn, this.minor)]), this.minor));
    } finally {
      secret.fill(0);
      dyn.fill(0);
    }
    return plain;
  }

  /**
   * A SEAL ciphertext whose components are the given polynomials (each L*N little-endian
   * words, SEAL's layout), with the metadata SEAL wrote for a fresh ciphertext at the data level.
   * @param {Uint8Array[]} polys
   */
  _composed(polys) {
    const S = this.S;
    const header = this._dataMeta.slice();
    new DataView(header.buffer).setBigUint64(33, BigInt(polys.length), true);
    const words = polys.reduce((total, p) => total + p.length, 0) / 8;
    const count = new Uint8Array(8);
    new DataView(count.buffer).setBigUint64(0, BigInt(words), true);
    const ct = new S.Ciphertext();
    ct.loadFromArray(this.context, sealObject(concat([header, sealObject(concat([count, ...polys]), this.minor)]), this.minor));
    return ct;
  }

  /**
   * Scores of every sample from a coeff-batch response (HRB1): per output, c1 (N coefficients)
   * then c0 at coefficients 0..B-1, modulo the first prime; coefficient b of output j decrypts
   * to sample b's score j (Python: BatchClient.decrypt).
   * @param {Uint8Array} body
   * @returns {Float64Array[]}
   */
  decryptBatch(body) {
    if (!this.batch) throw new Error('this model does not serve the coeff-batch layout');
    if (body.length < 8 || new TextDecoder().decode(body.subarray(0, 4)) !== 'HRB1') {
      throw new Error('payload does not start with HRB1');
    }
    const samples = new DataView(body.buffer, body.byteOffset, body.byteLength).getUint32(4, true);
    if (samples < 1 || samples > this.batchCapacity) throw new Error(`batch result for ${samples} samples`);
    const n = this.degree;
    const bits = Number(this.batch.result_prime_bits);
    const scale = Number(this.batch.output_scale);
    const c1Size = Math.ceil((n * bits) / 8);
    const c0Size = Math.ceil((samples * bits) / 8);
    const record = body.subarray(8);
    if (record.length !== this.nOutputs * (c1Size + c0Size)) {
      throw new Error(`batch result record is ${record.length} bytes, ${this.nOutputs * (c1Size + c0Size)} expected`);
    }
    const scores = Array.from({ length: samples }, () => new Float64Array(this.nOutputs));
    for (let j = 0; j < this.nOutputs; j++) {
      const at = j * (c1Size + c0Size);
      const c1 = unpackBits(record.subarray(at, at + c1Size), n, bits);
      const c0 = new BigUint64Array(n);
      c0.set(unpackBits(record.subarray(at + c1Size, at + c1Size + c0Size), samples, bits));
      const values = this._decryptLastLevel(c0, c1);
      for (let b = 0; b < samples; b++) scores[b][j] = values[b] / scale;
    }
    return scores;
  }

  // -- coeff-packed: rowpack's requests, products packed into few result ciphertexts ---------

  /**
   * A coeff-packed request (HEP1 + count + fixed-size records): each record is exactly
   * coeff-rowpack's (Python: PackedClient.encrypt).
   * @param {ArrayLike<number>[]} X
   */
  encryptPacked(X) {
    if (!this.packed) throw new Error('this model does not serve the coeff-packed layout');
    const records = X.map((x) => {
      if (x.length !== this.nFeatures) throw new Error(`expected ${this.nFeatures} features`);
      const q = this.quantize(x);
      return concat(this.imageElements.map((e) => this._encryptCoefficients(automorphism(q, e, this.degree))));
    });
    return concat([frameHead('HEP1', X.length), ...records]);
  }

  /** The automorphisms of coeff-packed's client levels (see imageElements); [1] without. */
  get imageElements() {
    return this.packed ? imageElements(this.packed, this.degree) : [1];
  }

  /**
   * Scores per sample from a coeff-packed response (HRP1 + count + fixed-size records); values
   * arrive multiplied by 2^levels (the packing tree) and output_scale.
   * @param {Uint8Array} body
   * @returns {Float64Array[]}
   */
  decryptPacked(body) {
    if (!this.packed) throw new Error('this model does not serve the coeff-packed layout');
    const size = this.packedRecordBytes;
    if (body.length < 8 || new TextDecoder().decode(body.subarray(0, 4)) !== 'HRP1') {
      throw new Error('payload does not start with HRP1');
    }
    const count = new DataView(body.buffer, body.byteOffset, body.byteLength).getUint32(4, true);
    if (count < 1 || body.length !== 8 + count * size) {
      throw new Error(`response has ${body.length} bytes; ${count} records of ${size} expected`);
    }
    const divisor = Number(this.packed.output_scale) * 2 ** Number(this.packed.levels);
    const bits = Number(this.packed.result_prime_bits);
    return Array.from({ length: count }, (_, i) =>
      this._decryptCompact(body.subarray(8 + i * size, 8 + (i + 1) * size), this.packed.results, bits, divisor, size),
    );
  }

  /**
   * The public key, plus the Galois keys when the model serves coeff-packed and `layouts` (the
   * layouts this caller may use; default all) include it: uploaded once per key whichever
   * layout a request then uses.
   * @param {string[]} [layouts]
   * @returns {Array<[ 'public' | 'relin' | 'galois', Uint8Array ]>}
   */
  keyParts(layouts) {
    /** @type {Array<[ 'public' | 'relin' | 'galois', Uint8Array ]>} */
    const parts = [['public', this.publicKeyBytes()]];
    if (this.packed && (!layouts || layouts.includes(PACKED_LAYOUT))) {
      parts.push(['galois', this.galoisKeyBytes()]);
    }
    return parts;
  }

  get keyFingerprint() {
    return this.fingerprint;
  }
}

// ================================================================================================
// Neural networks: CKKS, one image per ciphertext (layout ckks-network)
// ================================================================================================

/** The client side of a CNN's single-image layout (Python: plans.network.NetworkCodec). */
export class NetworkCodec {
  /**
   * @param {Seal} S
   * @param {Manifest} manifest the network's own manifest (the service's layout.plan_manifest)
   */
  constructor(S, manifest) {
    if (manifest.format !== 'heinfer-network') throw new Error('not a heinfer network manifest');
    const layout = manifest.input.layout;
    this.S = S;
    this.manifest = manifest;
    this.degree = Number(manifest.params.poly_modulus_degree);
    this.slots = this.degree / 2;
    if (layout.type !== 'copies' || layout.slots !== this.slots) throw new Error('unsupported input layout');
    /** @type {bigint[]} */ this.primes = manifest.params.coeff_modulus.map(BigInt);
    this.context = sealContext(S, S.SchemeType.ckks, this.degree, this.primes, null);
    this.encoder = new S.CKKSEncoder(this.context);
    this.fingerprint = ckksFingerprint(manifest.params);
    this.keyFingerprint = networkKeyFingerprint(manifest.params);
    this.minor = localMinor(S);
    this.copies = Number(layout.copies);
    this.stride = Number(layout.stride);
    this.scale = 2 ** Number(manifest.input.scale_log2);
    this.outSlots = manifest.output.slots.map(Number);
    this.levelPrimes = Number(manifest.output.level_primes);
    this.nFeatures = Number(manifest.input.shape[0]);
    this.maxRecordBytes = 64 + 16 * this.degree * this.primes.length;
    /** @type {any} */ this.secret = null;
  }

  keygen() {
    this.keygenerator = new this.S.KeyGenerator(this.context);
    this.secret = this.keygenerator.secretKey();
    this._ready();
  }

  _ready() {
    const S = this.S;
    const pk = this.keygenerator.createPublicKey();
    this.encryptor = new S.Encryptor(this.context, pk, this.secret);
    this.decryptor = new S.Decryptor(this.context, this.secret);
    pk.delete();
  }

  secretBytes() {
    return bytes(this.secret.saveToArray(this.S.ComprModeType.none));
  }

  /** @param {Uint8Array} data */
  loadSecret(data) {
    const S = this.S;
    this.secret = new S.SecretKey();
    this.secret.loadFromArray(this.context, data);
    this.keygenerator = new S.KeyGenerator(this.context, this.secret);
    this._ready();
  }

  /**
   * A SEAL Serializable saved uncompressed with the service's minor version in every header.
   * @param {any} serializable
   * @param {'ciphertext' | 'kswitch'} shape
   */
  _forService(serializable, shape) {
    const saved = bytes(serializable.saveToArray(this.S.ComprModeType.none)).slice();
    serializable.delete();
    setSealVersion(saved, 0, shape, SERVICE_SEAL_MINOR);
    return saved;
  }

  /**
   * The key parts the manifest asks for, each in SEAL's own seeded form (SEAL's Serializable
   * keys: the uniform halves travel as seeds), as the Python client sends them. `_layouts`
   * does not change them: the single-image layout, the one this client sends, needs them all.
   * @param {string[]} [_layouts]
   * @returns {Array<[ 'public' | 'relin' | 'galois', Uint8Array ]>}
   */
  keyParts(_layouts) {
    const kg = this.keygenerator;
    const keys = this.manifest.keys;
    const fp = this.fingerprint;
    /** @type {Array<[ 'public' | 'relin' | 'galois', Uint8Array ]>} */
    const parts = [['public', wrapEnvelope(ENVELOPE_KINDS.public, fp, this._forService(kg.createPublicKeySerializable(), 'ciphertext'))]];
    if (keys.relin) {
      parts.push(['relin', wrapEnvelope(ENVELOPE_KINDS.relin, fp, this._forService(kg.createRelinKeysSerializable(), 'kswitch'))]);
    }
    if (keys.galois_steps.length) {
      const steps = Int32Array.from(keys.galois_steps);
      const galois = kg.createGaloisKeysSerializableWithSteps(steps);
      parts.push(['galois', wrapEnvelope(ENVELOPE_KINDS.galois, fp, this._forService(galois, 'kswitch'))]);
    }
    return parts;
  }

  /**
   * One image as a seeded symmetric CKKS ciphertext of `copies` copies of its pixels.
   * @param {ArrayLike<number>} x 784 values in [0, 1]
   */
  encrypt(x) {
    if (x.length !== this.nFeatures) throw new Error(`expected ${this.nFeatures} pixels`);
    const S = this.S;
    const values = new Float64Array(this.slots);
    for (let c = 0; c < this.copies; c++) values.set(Array.from(x), c * this.stride);
    const plain = new S.Plaintext();
    this.encoder.encode(values, this.scale, plain);
    const blob = this._forService(this.encryptor.encryptSymmetricSerializable(plain), 'ciphertext');
    plain.delete();
    return wrapEnvelope(ENVELOPE_KINDS.ciphertext, this.fingerprint, blob);
  }

  /**
   * Every slot of one result ciphertext. The service's SEAL writes zstd-compressed 4.3 objects;
   * they are decompressed (fzstd) and their headers rewritten for node-seal's loader.
   * @param {Uint8Array} record
   */
  decryptSlots(record) {
    const S = this.S;
    const sealBytes = unwrapEnvelope(ENVELOPE_KINDS.ciphertext, this.fingerprint, record);
    const header = readSealHeader(sealBytes);
    if (header.size !== sealBytes.length) throw new Error('corrupt or truncated SEAL ciphertext');
    let payload = sealBytes.subarray(SEAL_HEADER_BYTES);
    if (header.compression === 2) payload = zstdDecompress(payload);
    else if (header.compression !== NONE) throw new Error(`unsupported SEAL compression ${header.compression}`);
    const object = sealObject(payload, this.minor);
    setSealVersion(object, 0, 'ciphertext', this.minor);
    const ct = new S.Ciphertext();
    try {
      ct.loadFromArray(this.context, object);
      if (ct.size() !== 2 || ct.coeffModulusSize() !== this.levelPrimes) {
        throw new Error('result ciphertext is not at the level the manifest states');
      }
      const plain = new S.Plaintext();
      this.decryptor.decrypt(ct, plain);
      const slots = Float64Array.from(this.encoder.decodeFloat64(plain));
      plain.delete();
      return slots;
    } finally {
      ct.delete();
    }
  }

  /** @param {Uint8Array} record */
  decrypt(record) {
    const slots = this.decryptSlots(record);
    return Float64Array.from(this.outSlots, (/** @type {number} */ k) => slots[k]);
  }

  /** @param {ArrayLike<number>[]} X */
  encryptRequest(X) {
    return encodeFrames('HNQ1', X.map((x) => this.encrypt(x)));
  }

  /** @param {Uint8Array} body */
  decryptResponse(body) {
    return decodeFrames('HNR1', body, this.maxRecordBytes).map((r) => this.decrypt(r));
  }
}

// ================================================================================================
// The client: HTTP plus a codec
// ================================================================================================

/** A layout this caller may not use: refused before any key or ciphertext is made (Python: heinfer.errors.LayoutDisabledError). */
export class LayoutDisabledError extends Error {
  name = 'LayoutDisabledError';
}

/**
 * The request formats a client may send to a model, from its manifest alone (Python:
 * `Client.allowed_layouts` and `Codec.layout_for(..., allowed=)`).
 */
export class LayoutChoice {
  /**
   * @param {Manifest} manifest
   * @param {string} model the model's name, for error messages
   */
  constructor(manifest, model) {
    this.model = model;
    const kind = String(manifest.layout?.kind);
    const packed = manifest.layout?.packed?.kind === PACKED_LAYOUT;
    const batch = manifest.layout?.batch?.kind === BATCH_LAYOUT;
    /** @type {string[]} what this client can send the model: coeff-packed, the family's per-sample layout, coeff-batch */
    this.served = kind === 'coeff-rowpack'
      ? [...(packed ? [PACKED_LAYOUT] : []), kind, ...(batch ? [BATCH_LAYOUT] : [])]
      : [kind];
    /** @type {string[] | undefined} the manifest's allowed_layouts: absent when every layout is open */
    this.offered = manifest.allowed_layouts;
    const offered = this.offered;
    /** of `served`, those this caller may use */
    this.allowed = offered ? this.served.filter((layout) => offered.includes(layout)) : this.served;
    /**
     * The layout for a request of a few samples, as the Python client picks it: coeff-packed
     * where served and allowed (the compiler picked it), else the family's own, else the first
     * allowed one (`Codec.fallback_layout`); the order of `served` says exactly that.
     */
    this.default = this.allowed[0] ?? kind;
  }

  /**
   * Refuse a layout this client cannot send or this caller may not use.
   * @param {string} layout
   */
  check(layout) {
    if (!this.served.includes(layout)) {
      throw new Error(`model ${this.model} is not served in layout ${layout} by this client: ${this.served.join(' or ')}`);
    }
    if (!this.allowed.length) {
      throw new LayoutDisabledError(
        `no layout of model ${this.model} that this client sends is allowed for this tenant (the manifest's allowed_layouts: ${this.offered?.join(', ') || 'none'})`,
      );
    }
    if (!this.allowed.includes(layout)) {
      throw new LayoutDisabledError(
        `the ${layout} layout of model ${this.model} is switched off for this tenant; allowed: ${this.allowed.join(', ')}`,
      );
    }
  }
}

/**
 * @typedef {{sent: number, received: number}} Traffic
 */

/** Encrypted predictions from a heinfer service (Python: heinfer.Client). */
export class Client {
  /**
   * @param {{baseUrl?: string, model: string, seal: Seal, manifest: Manifest, token?: string, fetch?: typeof fetch}} options
   */
  constructor({ baseUrl = '', model, seal, manifest, token, fetch: fetcher }) {
    this.baseUrl = baseUrl.replace(/\/$/, '');
    this.model = model;
    this.seal = seal;
    this.manifest = manifest;
    this.token = token;
    this._fetch = fetcher ?? globalThis.fetch.bind(globalThis);
    const kind = manifest.layout?.kind;
    if (kind === 'coeff-rowpack') this.codec = new LinearCodec(seal, manifest);
    else if (kind === 'ckks-network') this.codec = new NetworkCodec(seal, manifest.layout.plan_manifest);
    else throw new Error(`model ${model} uses layout ${kind}, which this client does not know`);
    /** the model's family (manifest layout.kind): the per-sample layout every model serves */
    this.family = kind;
    /** which layouts this caller may send (the manifest's allowed_layouts) */
    this.choice = new LayoutChoice(manifest, model);
    /** the layout for a request of a few samples (LayoutChoice.default) */
    this.layout = this.choice.default;
    /** @type {string | null} */ this.keyId = null;
    /** @type {Traffic} */ this.traffic = { sent: 0, received: 0 };
    /** @type {Uint8Array[]} every body this client sent, for audits (tests scan them) */
    this.sentBodies = [];
  }

  /**
   * Fetch the model's manifest (GET /v2/models/{name}/manifest; GET /v2/models/{name} is the
   * Open Inference Protocol's model metadata) and build a client for it.
   * @param {{baseUrl?: string, model: string, seal: Seal, token?: string, fetch?: typeof fetch}} options
   */
  static async connect(options) {
    const fetcher = options.fetch ?? globalThis.fetch.bind(globalThis);
    const base = (options.baseUrl ?? '').replace(/\/$/, '');
    const response = await fetcher(`${base}/v2/models/${encodeURIComponent(options.model)}/manifest`, {
      headers: options.token ? { Authorization: `Bearer ${options.token}` } : {},
    });
    if (!response.ok) throw await httpError(response);
    return new Client({ ...options, manifest: await response.json() });
  }

  /** @param {Record<string, string>} extra */
  _headers(extra = {}) {
    return { ...(this.token ? { Authorization: `Bearer ${this.token}` } : {}), ...extra };
  }

  /**
   * @param {string} path
   * @param {{method: string, headers: Record<string, string>, body?: Uint8Array}} init
   */
  async _send(path, init) {
    if (init.body) {
      this.traffic.sent += init.body.length;
      this.sentBodies.push(init.body);
    }
    const request = /** @type {RequestInit} */ (/** @type {unknown} */ (init));
    const response = await this._fetch(`${this.baseUrl}${path}`, request);
    if (!response.ok) throw await httpError(response);
    return response;
  }

  /** Make a secret key in this page (if there is none yet). */
  keygen() {
    if (!this.codec.secret) this.codec.keygen();
  }

  /**
   * The public key upload body (HEK1): what the layouts this caller may use need (a network's
   * single-image layout is the one this client sends; it needs every key its manifest names).
   */
  keyUpload() {
    if (!this.choice.allowed.length) this.choice.check(this.choice.default);  // LayoutDisabledError
    this.keygen();
    return encodeKeys(this.codec.keyFingerprint, this.codec.keyParts(this.choice.allowed));
  }

  /**
   * Upload the public key material; the secret key stays here.
   * @param {Uint8Array} [body] a body from keyUpload(), or a fresh one
   */
  async uploadKeys(body) {
    const payload = body ?? this.keyUpload();
    const response = await this._send(`/v2/keys?model=${encodeURIComponent(this.model)}`, {
      method: 'POST',
      body: payload,
      headers: this._headers({ 'Content-Type': 'application/octet-stream' }),
    });
    const reply = await response.json();
    this.traffic.received += JSON.stringify(reply).length;
    this.keyId = String(reply.key_id);
    return this.keyId;
  }

  /**
   * The request formats this client can send to this model and this caller may use: coeff-packed
   * where a linear model serves it, the family's per-sample layout, coeff-batch (many samples in
   * one request), only those the manifest's allowed_layouts names when it names any.
   * @returns {string[]}
   */
  get layouts() {
    return this.choice.allowed;
  }

  /**
   * Most samples one request of `layout` holds: N for coeff-batch, the manifest's max_batch for
   * the per-sample layouts.
   * @param {string} layout
   */
  capacity(layout) {
    if (layout === BATCH_LAYOUT && this.codec instanceof LinearCodec) return this.codec.batchCapacity;
    return Number(this.manifest.max_batch ?? Infinity);
  }

  /**
   * @param {ArrayLike<number>[]} X samples in the manifest's input range
   * @param {string} [layout] one of `layouts` (default: `layout`)
   * @param {(done: number, total: number) => void} [progress] coeff-batch: ciphertexts made so far
   */
  encrypt(X, layout = this.layout, progress = undefined) {
    this.choice.check(layout);
    this.keygen();
    if (layout === this.family) return this.codec.encryptRequest(X);
    if (this.codec instanceof LinearCodec) {
      if (layout === BATCH_LAYOUT) return this.codec.encryptBatch(X, progress);
      if (layout === PACKED_LAYOUT) return this.codec.encryptPacked(X);
    }
    throw new Error(`model ${this.model} is not served in layout ${layout} by this client`);
  }

  /**
   * encrypt(), giving the page its event loop back between coeff-batch's composed ciphertexts.
   * @param {ArrayLike<number>[]} X
   * @param {string} [layout]
   * @param {(done: number, total: number) => void} [progress]
   * @returns {Promise<Uint8Array>}
   */
  async encryptAsync(X, layout = this.layout, progress = undefined) {
    this.choice.check(layout);
    this.keygen();
    if (layout === BATCH_LAYOUT && this.codec instanceof LinearCodec) return this.codec.encryptBatchAsync(X, progress);
    return this.encrypt(X, layout);
  }

  /** @param {Uint8Array} body @returns {Promise<Uint8Array>} */
  async infer(body) {
    if (!this.keyId) throw new Error('no key uploaded yet: call uploadKeys() first');
    const response = await this._send(`/v2/models/${encodeURIComponent(this.model)}/infer`, {
      method: 'POST',
      body,
      headers: this._headers({ [KEY_ID_HEADER]: this.keyId, 'Content-Type': 'application/octet-stream' }),
    });
    const out = new Uint8Array(await response.arrayBuffer());
    this.traffic.received += out.length;
    return out;
  }

  /**
   * Scores per sample from a response of any layout this client sent (the magic says which).
   * @param {Uint8Array} payload
   * @returns {Float64Array[]}
   */
  decrypt(payload) {
    const magic = new TextDecoder().decode(payload.subarray(0, 4));
    if (magic === 'HRB1' && this.codec instanceof LinearCodec) return this.codec.decryptBatch(payload);
    if (magic === 'HRP1' && this.codec instanceof LinearCodec) return this.codec.decryptPacked(payload);
    return this.codec.decryptResponse(payload);
  }

  /** @param {ArrayLike<number>[]} X @param {string} [layout] */
  async predict(X, layout = this.layout) {
    this.choice.check(layout);
    if (!this.keyId) await this.uploadKeys();
    return this.decrypt(await this.infer(this.encrypt(X, layout)));
  }

  async deleteKeys() {
    if (!this.keyId) return;
    await this._send(`/v2/keys/${encodeURIComponent(this.keyId)}`, { method: 'DELETE', headers: this._headers() });
    this.keyId = null;
  }

  /** The secret key as SEAL bytes: only for storing it in this browser (IndexedDB). */
  secretBytes() {
    return this.codec.secretBytes();
  }

  /** @param {Uint8Array} data */
  loadSecret(data) {
    this.codec.loadSecret(data);
  }
}

/** @param {Response} response */
async function httpError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message = `${body.error ?? 'error'}: ${body.message ?? ''} (HTTP ${response.status})`;
  } catch {
    // not JSON
  }
  return new Error(message);
}
