"""``python -m resumekit`` is the same as the ``resumekit`` command."""

from .cli import main

main()
