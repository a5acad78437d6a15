"""``python -m trainer`` / ``torchrun -m trainer``: the same as ``irepa-train``."""

from trainer.cli import main

if __name__ == "__main__":
    main()
