"""``python -m amdflow`` runs the CLI."""

from amdflow.cli import main

main()
