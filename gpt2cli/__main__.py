"""`python -m gpt2cli ...` runs the `gpt2` command where it is not installed, e.g. from a
checkout on a GPU machine: `PYTHONPATH=. python3 -m gpt2cli generate "Hello"`."""

from gpt2cli.cli.app import main

if __name__ == "__main__":
    main()
