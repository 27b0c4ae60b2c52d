"""`python -m flows.cli ...`: the same as the `clipforget` console command."""

from flows.cli import main

main()
