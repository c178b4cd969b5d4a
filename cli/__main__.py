"""``python -m genforge.cli train|export|sample|eval ...``: the console scripts without their entry points."""

import sys

from .main import eval_command, export_command, sample_command, train_command

COMMANDS = {"train": train_command, "export": export_command, "sample": sample_command, "eval": eval_command}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m genforge.cli {{{'|'.join(COMMANDS)}}} [OPTIONS]")
    name = sys.argv.pop(1)
    COMMANDS[name](prog_name=f"gen-{name}")
