"""Build the demo's base model into the package: ``src/tuneloop/resources/demo_base/``.

Runs the recipe ``tuneloop.demo.base_model.build_base_model`` (``RECOMMENDED["model"]`` /
``RECOMMENDED["pretrain"]``, seed ``DEMO_BASE_SEED``) with one torch thread and writes safetensors weights,
the tokenizer (``tuneloop.modeling.save_tokenizer``: loadable by transformers 4.x and 5.x) and
``tuneloop_base.json`` (recipe + stats). Shipping the result means every machine fine-tunes the demo from
identical weights and skips the pretraining (85-140 s on one CPU core); floating-point differences
between CPUs otherwise give each machine a slightly different base.

Run it again whenever ``RECOMMENDED["model"]`` or ``RECOMMENDED["pretrain"]`` changes: until then
``tuneloop demo`` sees the shipped model as stale and builds the base itself.

    python scripts/build_demo_base.py            # writes src/tuneloop/resources/demo_base/
    python scripts/build_demo_base.py --out DIR  # somewhere else
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tuneloop.demo.base_model import DEMO_BASE_SEED, SHIPPED_BASE_DIR, build_base_model, shipped_base_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_BASE_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    args = parser.parse_args(argv)

    def progress(step: int, total: int) -> None:
        if step % 100 == 0 or step == total:
            print(f"  step {step}/{total}", file=sys.stderr, flush=True)

    stats = build_base_model(args.out, seed=DEMO_BASE_SEED, progress=progress, num_threads=args.threads)
    if shipped_base_model(args.out) is None:
        print(f"error: {args.out} does not read back as the current recipe's base model", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB): {stats}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
