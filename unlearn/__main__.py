"""`python -m unlearn`: the `unlearn` command."""

from unlearn.entry import main

main()
