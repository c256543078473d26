"""`python -m soppu_client.cli` runs the `soppu` command."""

from soppu_client.cli import main

main()
