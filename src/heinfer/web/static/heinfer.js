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
  replaceUniformHalf,
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
 */
function sealContext(S, schemeType, degree, primes, plainModulus) {
  const parms = new S.EncryptionParameters(schemeType);
  parms.setPolyModulusDegree(degree);
  const moduli = new S.VectorModulus();
  for (const q of primes) moduli.push_back(new S.Modulus(q));
  parms.setCoeffModulus(moduli);
  if (plainModulus !== null) parms.setPlainModulus(new S.Modulus(plainModulus));
  const context = new S.SEALContext(parms, true, S.SecLevelType.tc128);
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

// ================================================================================================
// Linear models: BFV, coefficient encoding (layout coeff-rowpack)
// ================================================================================================

/** The client side of a linear model's coeff-rowpack layout (Python: plans.linear.LinearCodec). */
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
    this.recordBytes = this.results.reduce(
      (/** @type {number} */ n, /** @type {any} */ r) =>
        n + Math.ceil((this.degree * this.bits) / 8) + Math.ceil((r.coefficients.length * this.bits) / 8),
      0,
    );
    this.nFeatures = Number(manifest.input.shape[0]);
    this.nOutputs = Number(manifest.output.shape[0]);
    /** @type {any} */ this.secret = null;
    /** metadata of a one-prime ciphertext, from SEAL (set with the key) */
    this._lastMeta = new Uint8Array(0);
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
    const s = plaintextArrays(this.secretBytes(), this.degree);
    const seed = randomBytes(SEED_BYTES);
    /** @type {Uint8Array[]} */ const parts = [seed];
    this.primes.forEach((q, j) => {
      const aSeeded = expandUniform(seed, q, j, 0, this.degree, PUBLIC_A_TAG);
      parts.push(packBits(replaceUniformHalf(pk0[j], a[j], aSeeded, s[j], q), bitLength(q)));
    });
    return concat(parts);
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
    const S = this.S;
    const plain = this._plaintext(this.quantize(x));
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
    if (record.length !== this.recordBytes) {
      throw new Error(`result record is ${record.length} bytes, ${this.recordBytes} expected`);
    }
    const S = this.S;
    const n = this.degree;
    const q1 = this.primes[0];
    const t = this.plainModulus;
    const scores = new Float64Array(this.nOutputs);
    let offset = 0;
    for (const result of this.results) {
      const coefficients = result.coefficients;
      const c1Size = Math.ceil((n * this.bits) / 8);
      const c0Size = Math.ceil((coefficients.length * this.bits) / 8);
      const c1 = unpackBits(record.subarray(offset, offset + c1Size), n, this.bits);
      const c0Out = unpackBits(record.subarray(offset + c1Size, offset + c1Size + c0Size), coefficients.length, this.bits);
      offset += c1Size + c0Size;
      if (c1.some((v) => v >= q1) || c0Out.some((v) => v >= q1)) throw new Error('result coefficient out of range');
      const data = new BigUint64Array(2 * n);
      coefficients.forEach((/** @type {number} */ k, /** @type {number} */ i) => {
        data[k] = c0Out[i];
      });
      data.set(c1, n);
      const dyn = new Uint8Array(8 + 16 * n);
      new DataView(dyn.buffer).setBigUint64(0, BigInt(2 * n), true);
      dyn.set(new Uint8Array(data.buffer), 8);
      const ct = new S.Ciphertext();
      ct.loadFromArray(this.context, sealObject(concat([this._lastMeta, sealObject(dyn, this.minor)]), this.minor));
      const plain = new S.Plaintext();
      this.decryptor.decrypt(ct, plain);
      const saved = bytes(plain.saveToArray(S.ComprModeType.none));
      const count = Number(new DataView(saved.buffer).getBigUint64(SEAL_HEADER_BYTES + 32, true));
      const values = polyArrays(saved, SEAL_HEADER_BYTES + 48 + SEAL_HEADER_BYTES + 8, 1, 1, count)[0][0];
      ct.delete();
      plain.delete();
      result.outputs.forEach((/** @type {number} */ row, /** @type {number} */ i) => {
        const k = coefficients[i];
        const v = k < count ? values[k] : 0n;
        const centered = v >= (t + 1n) / 2n ? v - t : v;
        scores[row] = Number(centered) / this.scale;
      });
    }
    return scores;
  }

  /** @param {ArrayLike<number>[]} X */
  encryptRequest(X) {
    return encodeFrames('HEQ1', X.map((x) => this.encrypt(x)));
  }

  /** @param {Uint8Array} body */
  decryptResponse(body) {
    return decodeFixedRecords(body, this.recordBytes).map((r) => this.decrypt(r));
  }

  /** @returns {Array<[ 'public' | 'relin' | 'galois', Uint8Array ]>} */
  keyParts() {
    return [['public', this.publicKeyBytes()]];
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
   * keys: the uniform halves travel as seeds), as the Python client sends them.
   * @returns {Array<[ 'public' | 'relin' | 'galois', Uint8Array ]>}
   */
  keyParts() {
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
    this.layout = kind;
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

  /** The public key upload body (HEK1) for this model's layout. */
  keyUpload() {
    this.keygen();
    return encodeKeys(this.codec.keyFingerprint, this.codec.keyParts());
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

  /** @param {ArrayLike<number>[]} X samples in the manifest's input range */
  encrypt(X) {
    this.keygen();
    return this.codec.encryptRequest(X);
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

  /** @param {Uint8Array} payload @returns {Float64Array[]} */
  decrypt(payload) {
    return this.codec.decryptResponse(payload);
  }

  /** @param {ArrayLike<number>[]} X */
  async predict(X) {
    if (!this.keyId) await this.uploadKeys();
    return this.decrypt(await this.infer(this.encrypt(X)));
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
