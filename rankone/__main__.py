"""`python -m rankone`: the same as the `rankone` command (what `torchrun ... -m rankone adapt` starts in each process)."""

from rankone.cli import main

if __name__ == "__main__":
    main()
