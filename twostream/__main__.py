"""`python -m twostream COMMAND`: the trainer's commands (train, evaluate, fuse-eval, ...)."""
from twostream.trainer_cli import main

main()
