"""`python -m tests [pytest args]`: pytest, then an exit without the interpreter's native teardown.

`make test` (and so CI) runs the suite this way. The test process holds native runtimes that no
raytag process combines: an in-process Ray driver and a Ray client, gloo process groups,
pyarrow's AWS SDK, grpc, and Chromium's driver. Some of their threads outlive their Python
objects: Ray's GCS-client I/O thread survives `ray.shutdown()`, and a destroyed gloo group's
threads last until garbage collection.

In 2 of 14 full runs (CI's and this machine's), the process died with SIGSEGV after pytest's
summary, with every test passed. Python's faulthandler was on and printed nothing, so the crash
came after faulthandler had been shut down: late in the interpreter's finalization or in the
native teardown after it, with those threads still running. raytag's own processes exit cleanly:
the tests that run the CLI check its exit code, and local and Ray runs end with code 0.

When `pytest.main` returns, pytest has already run every fixture teardown and its own cleanup.
The Python atexit handlers then run here, with the interpreter whole: pyarrow finalizes S3,
Ray shuts down, and a test cluster that was left over is stopped. Only the interpreter's
finalization and the C++ static destructors are skipped.
"""

from __future__ import annotations

import atexit
import os
import sys

import pytest

if __name__ == "__main__":
    code = int(pytest.main(sys.argv[1:]))
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
