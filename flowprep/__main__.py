"""`python -m flowprep` runs the `flowprep` command (twostream/flowprep_cli.py).

The command lines live above the libraries (they read the whole pipeline file, whose sections
belong to both flowprep and trainer), so this entry point re-executes that module instead of
importing it: the flowprep package itself never imports what sits above it.
"""
import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "twostream.flowprep_cli", *sys.argv[1:]])
