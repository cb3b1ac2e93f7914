"""Build the C++ extension ahead of time instead of on first use.

    python -m hmx_kernels.build                  compile into the cache ($HMX_KERNELS_CACHE,
                                                 default ~/.cache/hmx_kernels) and print where
    python -m hmx_kernels.build --into-package   also copy the build into this installed package
                                                 (hmx_kernels/_prebuilt/, looked at first; no
                                                 compiler or ninja needed afterwards)
    python -m hmx_kernels.build --x86-64         the x86-64-v4 (AVX-512) and x86-64-v3 (AVX2) flavours
                                                 instead of this CPU's own, for images and wheels that
                                                 run on other x86-64 CPU models (with --into-package)
    python -m hmx_kernels.build --clear-failed   forget failed fast builds (the `.failed` files),
                                                 so the next build tries the fast flavour again

The work is done by `hmx_kernels.cpp.build` (`build_ahead`, `clear_failed`): the same build, cache
folder and flavours as the first-use build. `HMX_KERNELS_BUILD_EXT=1 pip install
--no-build-isolation .` runs the same build during installation, `HMX_KERNELS_BUILD_EXT=x86-64` the
--x86-64 one.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmx_kernels.build", description=__doc__.split("\n")[0])
    parser.add_argument("--into-package", action="store_true",
                        help="also copy the build into hmx_kernels/_prebuilt/ of this installation")
    parser.add_argument("--x86-64", action="store_true",
                        help="build the x86-64-v4 / -v3 flavours (any AVX-512 / AVX2 CPU) instead of -march=native")
    parser.add_argument("--clear-failed", action="store_true",
                        help="delete the records of failed builds in the cache, then exit")
    args = parser.parse_args(argv)

    from .cpp import build

    try:
        if args.clear_failed:
            removed = build.clear_failed()
            for path in removed:
                print(f"removed {path}")
            print(f"{len(removed)} failed build record(s) cleared in {build.cache_dir()}")
            return 0
        build.build_ahead(into=build.prebuilt_dir() if args.into_package else None, x86_64=args.x86_64)
    except build.ExtensionBuildError as e:  # e.g. no home directory for the cache: set HMX_KERNELS_CACHE
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. --into-package where the installation is not writable
        print(f"error: cannot write the build there ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
