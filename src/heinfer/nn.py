"""HE-friendly network building blocks, torch optional.

`import heinfer.nn` never imports torch; the torch classes (`Square`, `PolyAct`) are created on
first attribute access, so numpy-only users of `heinfer.plans.network` are unaffected. Install
the CPU build of torch (`pip install torch==2.13.0`) to train or import torch models.

    from heinfer.nn import he_friendly_cnn, train_mnist_cnn
    model = train_mnist_cnn(X, y, epochs=30, seed=0)   # X: (n, 784) in [0, 1]
    spec = heinfer.plans.network.import_torch(model)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PolyAct", "Square", "he_friendly_cnn", "he_friendly_mlp", "train_mnist_cnn"]  # noqa: F822 (lazy)

_CLASSES: dict[str, Any] = {}


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "heinfer.nn needs PyTorch for this: pip install torch==2.13.0 (CPU build)"
        ) from exc
    return torch


def _build_classes() -> dict[str, Any]:
    if _CLASSES:
        return _CLASSES
    torch = _torch()
    nn = torch.nn

    class Square(nn.Module):  # type: ignore[name-defined]
        """x -> x * x, the CryptoNets activation (one ciphertext multiplication)."""

        def forward(self, x: Any) -> Any:
            return x * x

    class PolyAct(nn.Module):  # type: ignore[name-defined]
        """x -> a * x^2 + b * x with trainable a, b (one ciphertext multiplication)."""

        def __init__(self, a: float = 0.1, b: float = 1.0) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.tensor(float(a)))
            self.b = nn.Parameter(torch.tensor(float(b)))

        def forward(self, x: Any) -> Any:
            return self.a * x * x + self.b * x

    _CLASSES.update(Square=Square, PolyAct=PolyAct)
    return _CLASSES


def __getattr__(name: str) -> Any:
    if name in ("Square", "PolyAct"):
        return _build_classes()[name]
    raise AttributeError(f"module 'heinfer.nn' has no attribute {name!r}")


def he_friendly_cnn(filters: int = 5, kernel: int = 5, pool: int = 2, poly: bool = False) -> Any:
    """The default encrypted-inference CNN (multiplicative depth 3, one ciphertext per image).

    Unflatten(784 -> 1x28x28) -> Conv2d(1, filters, kernel, stride 1) -> Square (or PolyAct)
    -> AvgPool2d(pool) -> Flatten -> Linear(-> 10). With 5 filters the input is replicated 5
    times (5 x 784 <= 4096 slots at N=8192); conv + pooling + dense cost 24 + 18 rotations.
    """
    torch = _torch()
    nn = torch.nn
    classes = _build_classes()
    side = 28 - kernel + 1
    pooled = side // pool if pool > 1 else side
    layers: list[Any] = [nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, filters, kernel, 1)]
    layers.append(classes["PolyAct"]() if poly else classes["Square"]())
    if pool > 1:
        layers.append(nn.AvgPool2d(pool))
    layers += [nn.Flatten(), nn.Linear(filters * pooled * pooled, 10)]
    return nn.Sequential(*layers)


def he_friendly_mlp(hidden: int = 64, poly: bool = False) -> Any:
    """Linear(784 -> hidden) -> Square (or PolyAct) -> Linear(-> 10): depth 3 like the CNN.

    Cheap in the batched layout (784 x hidden scalar products per batch); in the single-image
    layout the dense first layer costs one rotation-free product per diagonal (~784 + hidden),
    so single images are slower than with the CNN.
    """
    torch = _torch()
    nn = torch.nn
    classes = _build_classes()
    activation = classes["PolyAct"]() if poly else classes["Square"]()
    return nn.Sequential(nn.Linear(784, hidden), activation, nn.Linear(hidden, 10))


def _shift_batch(xb: Any, max_shift: int, rng: np.random.Generator) -> Any:
    torch = _torch()
    n = xb.shape[0]
    img = xb.view(n, 1, 28, 28)
    pad = torch.nn.functional.pad(img, (max_shift,) * 4)
    dx = rng.integers(0, 2 * max_shift + 1, n)
    dy = rng.integers(0, 2 * max_shift + 1, n)
    out = torch.stack([pad[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(n)])
    return out.reshape(n, 784)


def train_mnist_cnn(
    X: np.ndarray,
    y: np.ndarray,
    epochs: int = 30,
    seed: int = 0,
    model: Any = None,
    batch_size: int = 64,
    augment: int = 2,
    threads: int = 2,
) -> Any:
    """Train `model` (default `he_friendly_cnn()`) on (n, 784) inputs in [0, 1].

    AdamW + one-cycle schedule, random shifts of up to `augment` pixels; on 2 cores the default
    CNN trains on 7,000 digits in about a minute.
    """
    torch = _torch()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = model if model is not None else he_friendly_cnn()
    Xt = torch.tensor(np.asarray(X, dtype=np.float32).reshape(-1, 784))
    yt = torch.tensor(np.asarray(y, dtype=np.int64))
    steps_per_epoch = (len(Xt) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(Xt))
        for i in range(0, len(Xt), batch_size):
            idx = perm[i : i + batch_size]
            xb = Xt[idx]
            if augment:
                xb = _shift_batch(xb, augment, rng)
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            sched.step()
    net.eval()
    return net
