"""What the zygote must reproduce of a fresh `python -m` process, printed for a comparison:

    python -m tests.pipelines.scripts.zygote_probe <args>

Unless PYTHONUNBUFFERED is set, stdout is block-buffered (a line written below Python comes out
before an earlier print); a warning goes to stderr, an atexit handler runs after the traceback of
an uncaught exception, and the exit code is 1.
"""

import atexit
import os
import sys
import warnings

atexit.register(lambda: print("atexit: ran after the traceback", file=sys.stderr))
print("stdout: printed first, buffered unless PYTHONUNBUFFERED")
os.write(1, b"fd 1: written below Python, comes out first if stdout is buffered\n")
print("stderr: printed", file=sys.stderr)
os.write(2, b"fd 2: written below Python\n")
warnings.warn("a warning, as Python shows it")
print(f"argv={sys.argv} name={__name__} cwd={os.getcwd()} path0={sys.path[0]} stdin={os.read(0, 10)!r}")
print(f"stdout: line_buffering={sys.stdout.line_buffering} write_through={sys.stdout.write_through}")
raise RuntimeError("uncaught: the interpreter prints the traceback and exits 1")
