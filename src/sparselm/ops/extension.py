"""Compiling an op's C++ source on first use, with torch's extension builder, or saying why it could not be.

Each C++ op (``paged_attention.cpp``, ``row_matmul.cpp``; what they share is in ``float_math.h``) is loaded once
per process by :func:`build` (a C++ compiler and ninja; ~10 s the first time, announced on stderr, then cached by
torch under ``~/.cache/torch_extensions``). Where it cannot be built, or its environment switch turns it off, the
op's Python side keeps PyTorch's own ops and reports the reason.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

OFF = ("0", "off", "false", "no")
NOTICE_AFTER_S = 2.0  # a load still running after this long is compiling: say so, once, on stderr


def build_flags() -> tuple[str, list[str]]:
    """(name suffix, compiler flags): AVX2 code on x86 CPUs that have it, portable code elsewhere. The suffix keeps
    builds for different flags apart in torch's extension cache (the same home directory may see other CPUs)."""
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for runs serially in an extension built without it
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", [*flags, "-mavx2", "-mfma"]
    return "generic", flags


def build(name: str, source: Path, switch: str) -> str | None:
    """Compile and load ``source`` as extension ``name`` (its ``TORCH_LIBRARY`` ops register themselves); None if
    loaded, else why not. The environment variable ``switch`` set to off/0/false/no skips it."""
    if os.environ.get(switch, "").lower() in OFF:
        return f"turned off by {switch}"
    try:
        from torch.utils import cpp_extension

        venv_bin = str(Path(sys.executable).parent)  # the `ninja` package's binary, in a venv not on PATH
        if shutil.which("ninja") is None and shutil.which("ninja", path=venv_bin):
            os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        suffix, flags = build_flags()
        # torch rebuilds when a source or a flag changes, not a header: the headers' hash is made a flag.
        headers = b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
        flags = [*flags, f"-DSPARSELM_HEADERS_SHA1={hashlib.sha1(headers).hexdigest()[:16]}"]
        notice = threading.Timer(NOTICE_AFTER_S, _compiling_notice, (f"{name}_{suffix}",))
        notice.daemon = True
        notice.start()
        try:
            cpp_extension.load(
                name=f"{name}_{suffix}", sources=[str(source)], extra_cflags=flags, is_python_module=False,
                verbose=False,
            )  # fmt: skip
        finally:
            notice.cancel()
    except Exception as exc:  # no compiler, no ninja, an unsupported platform: all mean "use PyTorch's ops"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the C++ kernel could not be built ({first_line})"
    return None


def _compiling_notice(name: str) -> None:
    print(f"sparselm: compiling the C++ op {name} (once per machine and source version, ~10 s)",
          file=sys.stderr, flush=True)  # fmt: skip
