"""twostream: the composition on top (pipeline files, whose sections belong to every package, and the
two command lines, `flowprep` and `python -m twostream`), over flowprep, trainer and core."""
