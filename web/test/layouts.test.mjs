// node --test: which layouts the client offers and picks from a manifest's allowed_layouts
// (Python: Client.allowed_layouts, Codec.fallback_layout), without SEAL.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LayoutChoice, LayoutDisabledError } from '../src/heinfer.js';

/** A linear model's manifest, as far as the layout choice reads it. @param {Record<string, any>} extra */
const linear = (extra = {}) => ({
  layout: { kind: 'coeff-rowpack', packed: { kind: 'coeff-packed' }, batch: { kind: 'coeff-batch' } },
  ...extra,
});

test('without allowed_layouts every served layout is open and coeff-packed is the default', () => {
  const choice = new LayoutChoice(linear(), 'mnist');
  assert.deepEqual(choice.allowed, ['coeff-packed', 'coeff-rowpack', 'coeff-batch']);
  assert.equal(choice.default, 'coeff-packed');
  for (const layout of choice.allowed) choice.check(layout);
  const plain = new LayoutChoice({ layout: { kind: 'coeff-rowpack' } }, 'mnist');
  assert.deepEqual(plain.allowed, ['coeff-rowpack']);
  assert.equal(plain.default, 'coeff-rowpack');
});

test('allowed_layouts filters the layouts and the default falls back as the Python client does', () => {
  const rowOnly = new LayoutChoice(linear({ format_version: 3, allowed_layouts: ['coeff-rowpack'] }), 'mnist');
  assert.deepEqual(rowOnly.allowed, ['coeff-rowpack']);
  assert.equal(rowOnly.default, 'coeff-rowpack');
  const noPacked = new LayoutChoice(linear({ allowed_layouts: ['coeff-batch', 'coeff-rowpack'] }), 'mnist');
  assert.deepEqual(noPacked.allowed, ['coeff-rowpack', 'coeff-batch']);
  assert.equal(noPacked.default, 'coeff-rowpack');
  const batchOnly = new LayoutChoice(linear({ allowed_layouts: ['coeff-batch'] }), 'mnist');
  assert.equal(batchOnly.default, 'coeff-batch');
  // a layout this client does not send (or know) is left out, as the Python client does
  const network = new LayoutChoice({ layout: { kind: 'ckks-network' }, allowed_layouts: ['ckks-network', 'ckks-network-batch'] }, 'cnn');
  assert.deepEqual(network.allowed, ['ckks-network']);
});

test('a forced disallowed layout is refused, naming the allowed ones', () => {
  const choice = new LayoutChoice(linear({ allowed_layouts: ['coeff-rowpack'] }), 'mnist');
  choice.check('coeff-rowpack');
  for (const layout of ['coeff-batch', 'coeff-packed']) {
    assert.throws(() => choice.check(layout), (error) => {
      assert.ok(error instanceof LayoutDisabledError);
      assert.equal(error.name, 'LayoutDisabledError');
      assert.match(error.message, new RegExp(`the ${layout} layout of model mnist is switched off for this tenant; allowed: coeff-rowpack$`));
      return true;
    });
  }
  // a layout the model does not serve at all is a different error
  assert.throws(() => choice.check('ckks-network'), (error) => !(error instanceof LayoutDisabledError) && /not served in layout ckks-network/.test(String(error)));
  const none = new LayoutChoice(linear({ allowed_layouts: [] }), 'mnist');
  const network = new LayoutChoice({ layout: { kind: 'ckks-network' }, allowed_layouts: ['ckks-network-batch'] }, 'cnn');
  assert.deepEqual(network.allowed, []);
  assert.deepEqual(none.allowed, []);
  assert.throws(() => none.check(none.default), /no layout of model mnist that this client sends is allowed for this tenant \(the manifest's allowed_layouts: none\)/);
  assert.throws(() => network.check('ckks-network'), LayoutDisabledError);
});
