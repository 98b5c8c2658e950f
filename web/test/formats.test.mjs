// node --test: formats.js against published known answers and its own inverses. The byte-for-
// byte comparison with the Python client is tests/web/test_js_formats.py (it runs vectors.mjs).
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import * as f from '../src/formats.js';
import { galoisStep } from '../src/heinfer.js';

const hex = (/** @type {Uint8Array} */ b) => Buffer.from(b).toString('hex');

test('SHAKE-128 matches FIPS 202 known answers and Node crypto at every length', () => {
  // FIPS 202 / NIST example: SHAKE128("") first 32 bytes
  assert.equal(hex(f.shake128(new Uint8Array(0), 32)), '7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26');
  for (const size of [0, 1, 135, 167, 168, 169, 300, 1000]) {
    const data = randomBytes(size);
    for (const length of [1, 168, 169, 500, 8 * 4096]) {
      const expected = createHash('shake128', { outputLength: length }).update(data).digest('hex');
      assert.equal(hex(f.shake128(data, length)), expected, `input ${size} output ${length}`);
    }
  }
});

test('SHA-256 matches Node crypto across block boundaries', () => {
  for (const size of [0, 1, 55, 56, 63, 64, 65, 119, 120, 1000]) {
    const data = randomBytes(size);
    assert.equal(hex(f.sha256(data)), createHash('sha256').update(data).digest('hex'));
  }
});

test('bit packing is exact and inverts at every width', () => {
  for (const bits of [1, 7, 8, 17, 18, 31, 32, 33, 36, 55, 60, 64]) {
    for (const count of [0, 1, 7, 8, 9, 100]) {
      const values = new BigUint64Array(count).map(() => BigInt.asUintN(bits, randomBytes(8).readBigUInt64LE()));
      const packed = f.packBits(values, bits);
      assert.equal(packed.length, Math.ceil((count * bits) / 8));
      assert.deepEqual(f.unpackBits(packed, count, bits), values);
    }
  }
  // value k occupies bits [k*bits, (k+1)*bits) of one little-endian stream
  assert.equal(hex(f.packBits(BigUint64Array.of(1n, 2n, 3n), 4)), '2103');
});

test('expanded polynomials are below q and differ per index and prime', () => {
  const seed = randomBytes(32);
  const q = 68719403009n;
  const a = f.expandUniform(seed, q, 0, 0, 4096);
  assert.ok(a.every((v) => v < q));
  assert.notDeepEqual(a, f.expandUniform(seed, q, 0, 1, 4096));
  assert.notDeepEqual(a, f.expandUniform(seed, q, 1, 0, 4096));
  assert.throws(() => f.expandUniform(seed.subarray(1), q, 0, 0, 16));
});

test('setSealVersion rewrites every nested header and refuses compressed objects', () => {
  const array = f.sealObject(new Uint8Array(8 + 16), 1);
  const seed = f.sealObject(new Uint8Array(65), 1);
  const object = f.sealObject(f.concat([new Uint8Array(73), array, seed]), 1);
  f.setSealVersion(object, 0, 'ciphertext', 3);
  assert.equal(object[4], 3);
  assert.equal(object[16 + 73 + 4], 3);
  assert.equal(object[16 + 73 + array.length + 4], 3);
  object[5] = 2;
  assert.throws(() => f.setSealVersion(object, 0, 'ciphertext', 1), /compressed/);
});

test('frames refuse truncated and foreign bodies', () => {
  const body = f.encodeFrames('HNR1', [Uint8Array.of(1, 2), Uint8Array.of(3)]);
  assert.deepEqual(f.decodeFrames('HNR1', body, 10).map((r) => Array.from(r)), [[1, 2], [3]]);
  assert.throws(() => f.decodeFrames('HNR1', body.subarray(0, body.length - 1), 10));
  assert.throws(() => f.decodeFrames('HER1', body, 10));
  assert.throws(() => f.decodeFixedRecords(body, 3));
});

test('galoisStep finds the power of 3 SEAL maps a rotation step to, and refuses the rest', () => {
  for (const degree of [4096, 8192]) {
    for (const element of [3, 9, 17, 33, 1 + (2 * degree) / 8]) {
      const step = galoisStep(element, degree);
      let power = 1n;
      for (let k = 0; k < step; k++) power = (power * 3n) % BigInt(2 * degree);
      assert.equal(Number(power), element);
    }
    assert.throws(() => galoisStep(5, degree), /not a power of 3/); // -3 mod 8: not in <3>
  }
});
