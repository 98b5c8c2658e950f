"""`python -m heinfer` runs the command line."""

from heinfer.cli import main

main()
