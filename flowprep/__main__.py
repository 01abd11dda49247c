"""`python -m flowprep ...`, same as the `flowprep` command."""
from flowprep.cli import main

main()
