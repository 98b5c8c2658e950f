"""Encrypted neural networks (CKKS, LoLa/CryptoNets style): import, compile, serve, encrypt.

Pipeline::

    spec = import_torch(model)                   # or import_onnx(path): numpy weights
    plan = compile_network(spec, "mnist")        # server side, private (a base.Plan)
    codec = NetworkCodec(plan.manifest)          # client side, from the public manifest only
    secret = codec.keygen()
    keys = plan.load_keys(codec.key_upload(secret))          # both layouts' keys
    scores = codec.decrypt(secret, plan.evaluate(codec.encrypt(secret, X), keys))
    # the batched layout, up to 4096 inputs per request, keys without Galois keys:
    keys = plan.load_keys(codec.key_upload(secret, [BATCH_LAYOUT]))
    body = codec.encrypt(secret, X, BATCH_LAYOUT)

Modules: `spec` (NetworkSpec), `importers` (torch, ONNX), `compiler` (compile_network),
`scales` (modulus chain, scales, noise), `schedule` (one description of each layout's
evaluation and its walk), `plan` (NetworkPlan, the SEAL executor), `single` and `batch` (the
layouts), `codec` (NetworkCodec), `simulate` (the plaintext executor), `frames` (wire format),
`manifest` (the public description).
"""

from heinfer.plans.network.codec import NetworkCodec, NetworkSecret
from heinfer.plans.network.compiler import compile_network
from heinfer.plans.network.importers import import_onnx, import_torch
from heinfer.plans.network.manifest import BATCH_LAYOUT, FAMILY, SINGLE_LAYOUT
from heinfer.plans.network.plan import NetworkPlan, convert_v1_network
from heinfer.plans.network.spec import NetworkSpec

__all__ = [
    "BATCH_LAYOUT",
    "FAMILY",
    "SINGLE_LAYOUT",
    "NetworkCodec",
    "NetworkPlan",
    "NetworkSecret",
    "NetworkSpec",
    "compile_network",
    "convert_v1_network",
    "import_onnx",
    "import_torch",
]
