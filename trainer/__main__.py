"""``python -m irepa.trainer`` / ``torchrun -m irepa.trainer``: the same as ``irepa-train``."""

from irepa.trainer.cli import main

if __name__ == "__main__":
    main()
