"""`python -m trainer` runs `python -m twostream` (twostream/trainer_cli.py), the trainer's commands.

The command lines live above the libraries (they read the whole pipeline file), so this entry
point re-executes that module instead of importing it: the trainer package never imports what
sits above it.
"""
import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "twostream", *sys.argv[1:]])
