// @ts-check
/**
 * The page `heinfer serve` shows at /: draw or drop a digit, encrypt it here, let the service
 * compute on the ciphertext, decrypt the ten scores here. Everything it loads comes from the
 * service (strict CSP); the secret key lives in this page's memory, or in IndexedDB if asked.
 */
import initialize from './vendor/node-seal/index_throws.js';
import { BATCH_LAYOUT, Client, PACKED_LAYOUT, sealMessage } from './heinfer.js';

const $ = (/** @type {string} */ id) => /** @type {any} */ (document.getElementById(id));
const pad = /** @type {HTMLCanvasElement} */ ($('pad'));
const ink = /** @type {CanvasRenderingContext2D} */ (pad.getContext('2d', { willReadFrequently: true }));
const audit = new URLSearchParams(location.search).has('audit');

/** @type {any} */ let seal = null;
/** @type {Map<string, Client>} */ const clients = new Map();
/** @type {Float64Array[] | null} pixels of the dropped images, exactly as decoded (28x28 each) */
let imagePixels = null;
let drawn = false;
let runs = 0;
let images = 0;

const state = {
  /** @type {Float64Array | null} the 784 values of the first image last encrypted */
  lastInput: null,
  /** @type {Record<string, any> | null} */
  lastResult: null,
};

function status(/** @type {string} */ text) {
  $('status').textContent = text;
}

// -- drawing ------------------------------------------------------------------------------------
function clearPad() {
  ink.fillStyle = '#000';
  ink.fillRect(0, 0, pad.width, pad.height);
  imagePixels = null;
  drawn = false;
}

/** @param {PointerEvent} event */
function point(event) {
  const box = pad.getBoundingClientRect();
  return [((event.clientX - box.left) * pad.width) / box.width, ((event.clientY - box.top) * pad.height) / box.height];
}

let last = /** @type {number[] | null} */ (null);
pad.addEventListener('pointerdown', (event) => {
  if (imagePixels) clearPad();
  pad.setPointerCapture(event.pointerId);
  last = point(event);
  stroke(last, last);
});
pad.addEventListener('pointermove', (event) => {
  if (!last) return;
  const next = point(event);
  stroke(last, next);
  last = next;
});
pad.addEventListener('pointerup', () => {
  last = null;
});

/** @param {number[]} from @param {number[]} to */
function stroke(from, to) {
  ink.strokeStyle = '#fff';
  ink.lineWidth = 22;
  ink.lineCap = 'round';
  ink.beginPath();
  ink.moveTo(from[0], from[1]);
  ink.lineTo(to[0], to[1]);
  ink.stroke();
  drawn = true;
}

/**
 * A drawing as MNIST sees digits: the ink's bounding box scaled into 20x20, centred by its
 * centre of mass in a 28x28 frame, values in [0, 1].
 */
function drawingPixels() {
  const { data } = ink.getImageData(0, 0, pad.width, pad.height);
  let [x0, y0, x1, y1] = [pad.width, pad.height, -1, -1];
  for (let y = 0; y < pad.height; y++) {
    for (let x = 0; x < pad.width; x++) {
      if (data[4 * (y * pad.width + x)] > 20) {
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
      }
    }
  }
  if (x1 < 0) return new Float64Array(784);
  const side = Math.max(x1 - x0, y1 - y0) + 1;
  const small = document.createElement('canvas');
  small.width = small.height = 28;
  const sctx = /** @type {CanvasRenderingContext2D} */ (small.getContext('2d', { willReadFrequently: true }));
  sctx.fillStyle = '#000';
  sctx.fillRect(0, 0, 28, 28);
  const w = (20 * (x1 - x0 + 1)) / side;
  const h = (20 * (y1 - y0 + 1)) / side;
  sctx.drawImage(pad, x0, y0, x1 - x0 + 1, y1 - y0 + 1, (28 - w) / 2, (28 - h) / 2, w, h);
  const boxed = grey(sctx.getImageData(0, 0, 28, 28).data);
  // shift so the centre of mass sits at the centre, as MNIST was made
  let [mass, mx, my] = [0, 0, 0];
  boxed.forEach((v, i) => { mass += v; mx += v * (i % 28); my += v * Math.floor(i / 28); });
  const dx = Math.round(13.5 - mx / mass);
  const dy = Math.round(13.5 - my / mass);
  const out = new Float64Array(784);
  for (let y = 0; y < 28; y++) {
    for (let x = 0; x < 28; x++) {
      const sx = x - dx;
      const sy = y - dy;
      if (sx >= 0 && sx < 28 && sy >= 0 && sy < 28) out[y * 28 + x] = boxed[sy * 28 + sx];
    }
  }
  return out;
}

/** @param {Uint8ClampedArray} rgba */
function grey(rgba) {
  const out = new Float64Array(rgba.length / 4);
  for (let i = 0; i < out.length; i++) {
    out[i] = Math.round(0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]) / 255;
  }
  return out;
}

/**
 * A photo or image file as 28x28 values: scaled to 28x28 (an MNIST image is taken pixel for
 * pixel), inverted when the background is light (dark ink on paper).
 * @param {Blob} file
 */
async function imageValues(file) {
  const bitmap = await createImageBitmap(file);
  const small = document.createElement('canvas');
  small.width = small.height = 28;
  const sctx = /** @type {CanvasRenderingContext2D} */ (small.getContext('2d', { willReadFrequently: true }));
  sctx.drawImage(bitmap, 0, 0, 28, 28);
  const values = grey(sctx.getImageData(0, 0, 28, 28).data);
  const mean = values.reduce((a, b) => a + b, 0) / values.length;
  return mean > 0.5 ? values.map((v) => 1 - v) : values;
}

/**
 * One or more dropped images: all are encrypted together when the button is pressed (one
 * request; with the coeff-batch layout, one ciphertext per pixel for all of them). The pad
 * shows the first.
 * @param {ArrayLike<Blob>} files
 */
async function loadImages(files) {
  const loaded = [];
  for (const file of Array.from(files)) loaded.push(await imageValues(file));
  imagePixels = loaded;
  drawn = false;
  const small = document.createElement('canvas');
  small.width = small.height = 28;
  ink.imageSmoothingEnabled = false;
  const view = ink.createImageData(28, 28);
  loaded[0].forEach((v, i) => { view.data.set([255 * v, 255 * v, 255 * v, 255], 4 * i); });
  small.getContext('2d')?.putImageData(view, 0, 0);
  ink.drawImage(small, 0, 0, pad.width, pad.height);
  pad.dataset.image = String(++images);
  status(loaded.length === 1 ? 'Image loaded. Press the button.' : `${loaded.length} images loaded (the pad shows the first). Press the button.`);
}

$('photo').addEventListener('change', async (/** @type {Event} */ event) => {
  const input = /** @type {HTMLInputElement} */ (event.target);
  if (input.files?.length) await loadImages(input.files);
  input.value = '';
});
pad.addEventListener('dragover', (event) => event.preventDefault());
pad.addEventListener('drop', async (event) => {
  event.preventDefault();
  const files = event.dataTransfer?.files;
  if (files?.length) await loadImages(files);
});
$('clear').addEventListener('click', clearPad);

// -- secret key persistence (opt-in) ------------------------------------------------------------
/** @returns {Promise<IDBDatabase>} */
function database() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open('heinfer', 1);
    request.onupgradeneeded = () => request.result.createObjectStore('secrets');
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/** @param {'get' | 'put' | 'delete'} op @param {string} key @param {Uint8Array} [value] */
async function secrets(op, key, value) {
  const db = await database();
  return new Promise((resolve, reject) => {
    const store = db.transaction('secrets', op === 'get' ? 'readonly' : 'readwrite').objectStore('secrets');
    const request = op === 'get' ? store.get(key) : op === 'put' ? store.put(value, key) : store.delete(key);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/** @param {Client} client */
function secretName(client) {
  const fp = Array.from(client.codec.keyFingerprint.subarray(0, 8), (b) => b.toString(16).padStart(2, '0')).join('');
  return `${client.model}:${fp}`;
}

// -- the service --------------------------------------------------------------------------------
function token() {
  return $('token').value || undefined;
}

async function listModels() {
  const response = await fetch('v2/models', { headers: token() ? { Authorization: `Bearer ${token()}` } : {} });
  if (response.status === 401) {
    $('token-row').classList.remove('hidden');
    throw new Error('this service needs a token: paste it above and reload');
  }
  const { models } = await response.json();
  const select = $('model');
  select.replaceChildren();
  for (const m of models) {
    const option = document.createElement('option');
    option.value = m.name;
    option.textContent = `${m.name} (${m.estimator})`;
    select.append(option);
  }
}

/** @param {string} model */
async function clientFor(model) {
  let client = clients.get(model);
  if (!client) {
    client = await Client.connect({ model, seal, token: token() });
    clients.set(model, client);
    if (audit) /** @type {any} */ (window).heinferClients = clients;
  }
  return client;
}

/**
 * Encrypt the images, ask the service, decrypt: one request in the chosen layout.
 * @param {Float64Array[]} X
 */
async function run(X) {
  const model = $('model').value;
  const times = /** @type {Array<[string, number]>} */ ([]);
  const timed = async (/** @type {string} */ name, /** @type {() => any} */ work) => {
    const start = performance.now();
    const out = await work();
    times.push([name, performance.now() - start]);
    return out;
  };
  const client = await timed('connect (manifest, SEAL context)', () => clientFor(model));
  const layout = client.layouts.includes($('layout').value) ? $('layout').value : client.layout;
  client.choice.check(layout); // before any key is made or sent
  if (X.length > client.capacity(layout)) throw new Error(`one ${layout} request holds at most ${client.capacity(layout)} images`);
  const sentBefore = client.traffic.sent;
  const receivedBefore = client.traffic.received;
  if (!client.codec.secret) {
    const stored = $('keep').checked ? await secrets('get', secretName(client)) : undefined;
    if (stored) await timed('load kept secret key', () => client.loadSecret(stored));
    else await timed('key generation', () => client.keygen());
    if ($('keep').checked && !stored) await secrets('put', secretName(client), client.secretBytes());
  }
  let keyBytes = 0;
  if (!client.keyId) {
    const upload = await timed('public key(s): make', () => client.keyUpload());
    await timed('public key(s): upload', () => client.uploadKeys(upload));
    keyBytes = upload.length;
  }
  const progress = (/** @type {number} */ done, /** @type {number} */ total) => status(`Encrypting: ${done} of ${total} ciphertexts…`);
  const body = await timed('encrypt', () => client.encryptAsync(X, layout, progress));
  status(`Sending ${size(body.length)} of ciphertext; the service computes on it…`);
  const response = await timed('service (network + encrypted inference)', () => client.infer(body));
  const all = await timed('decrypt', () => client.decrypt(response));
  const predictions = all.map((scores) => ({ digit: argmax(scores), scores: Array.from(scores) }));
  return {
    model,
    samples: X.length,
    predictions,
    scores: predictions[0].scores,
    digit: predictions[0].digit,
    times,
    sent: client.traffic.sent - sentBefore,
    received: client.traffic.received - receivedBefore,
    request: body,
    response: response.length,
    keyBytes,
    layout,
  };
}

/** @param {ArrayLike<number>} values */
function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** @param {number} n */
function size(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(2)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`;
}

/** @param {Awaited<ReturnType<typeof run>>} result */
function show(result) {
  $('digit').textContent = String(result.digit);
  const others = $('digits');
  others.textContent = result.samples > 1 ? `all ${result.samples}: ${result.predictions.map((p) => p.digit).join(' ')}` : '';
  const bars = $('bars');
  bars.replaceChildren();
  const lo = Math.min(0, ...result.scores);
  const hi = Math.max(...result.scores);
  result.scores.forEach((score, k) => {
    const label = document.createElement('span');
    label.textContent = String(k);
    const bar = document.createElement('div');
    bar.className = k === result.digit ? 'bar best' : 'bar';
    const fill = document.createElement('i');
    const zero = (-lo / (hi - lo || 1)) * 100;
    const at = ((score - lo) / (hi - lo || 1)) * 100;
    fill.style.left = `${Math.min(zero, at)}%`;
    fill.style.width = `${Math.max(0.5, Math.abs(at - zero))}%`;
    bar.append(fill);
    const value = document.createElement('span');
    value.className = 'v';
    value.textContent = score.toFixed(3);
    bars.append(label, bar, value);
  });
  const rows = (/** @type {string} */ id, /** @type {Array<[string, string]>} */ items) => {
    $(id).tBodies[0].replaceChildren(...items.map(([k, v]) => {
      const tr = document.createElement('tr');
      const a = document.createElement('td');
      a.textContent = k;
      const b = document.createElement('td');
      b.textContent = v;
      tr.append(a, b);
      return tr;
    }));
  };
  const per = result.samples > 1 ? ` (${result.samples} images)` : '';
  rows('times', result.times.map(([k, ms]) => [k + per, `${ms.toFixed(1)} ms`]));
  rows('bytes', [
    ...(result.keyBytes ? /** @type {Array<[string, string]>} */ ([['public key(s), once per key', size(result.keyBytes)]]) : []),
    ['encrypted request', size(result.request.length)],
    ['encrypted response', size(result.response)],
    ['total sent / received', `${size(result.sent)} / ${size(result.received)}`],
  ]);
  const head = Array.from(result.request.subarray(0, 48), (b) => b.toString(16).padStart(2, '0')).join(' ');
  const seen = $('seen');
  seen.replaceChildren();
  const what = result.samples > 1 ? ` for ${result.samples} images` : '';
  seen.append(`One ${result.layout} request of ${size(result.request.length)}${what}: ciphertext only, no key. First bytes:`);
  const code = document.createElement('code');
  code.textContent = head + ' …';
  seen.append(code);
  seen.append('The server computed the scores on this and sent back ciphertexts it cannot read.');
}

$('go').addEventListener('click', async () => {
  const button = $('go');
  button.disabled = true;
  try {
    const X = imagePixels ?? (drawn ? [drawingPixels()] : null);
    if (!X) throw new Error('draw a digit or drop a photo first');
    status('Encrypting and asking the service…');
    state.lastInput = X[0];
    const result = await run(X);
    state.lastResult = { ...result, request: undefined };
    show(result);
    document.body.dataset.run = String(++runs);
    status(`Done: the service saw ${size(result.request.length)} of ciphertext.`);
  } catch (error) {
    status(`Error: ${sealMessage(seal, error)}`);
    document.body.dataset.error = String(runs + 1);
  } finally {
    button.disabled = false;
  }
});

/**
 * The request formats the chosen model offers this page and this caller may use (the manifest's
 * allowed_layouts), the client's default selected; the choice shows only when there is one.
 */
async function showLayouts() {
  const select = $('layout');
  const client = await clientFor($('model').value);
  select.replaceChildren();
  for (const layout of client.layouts) {
    const option = document.createElement('option');
    option.value = layout;
    option.textContent = layout === BATCH_LAYOUT
      ? `all loaded images in one request (${layout}, up to ${client.capacity(layout)})`
      : layout === PACKED_LAYOUT
        ? `one ciphertext per image, scores packed in one (${layout})`
        : `one ciphertext per image (${layout})`;
    select.append(option);
  }
  select.value = client.layout;
  $('layout-row').classList.toggle('hidden', client.layouts.length < 2);
}

$('model').addEventListener('change', async () => {
  $('model-info').textContent = '';
  document.body.dataset.layouts = '';
  try {
    await showLayouts();
    document.body.dataset.layouts = $('model').value;
  } catch (error) {
    status(`Error: ${sealMessage(seal, error)}`);
  }
});

async function start() {
  clearPad();
  try {
    const t0 = performance.now();
    seal = await initialize();
    const ms = performance.now() - t0;
    await listModels();
    await showLayouts();
    document.body.dataset.layouts = $('model').value;
    status(`SEAL (WebAssembly) ready in ${ms.toFixed(0)} ms. Draw a digit.`);
    $('go').disabled = false;
    document.body.dataset.ready = '1';
  } catch (error) {
    status(`Error: ${sealMessage(seal, error)}`);
  }
}

if (audit) /** @type {any} */ (window).heinferPage = state;
start();
