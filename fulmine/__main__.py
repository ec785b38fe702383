"""`python -m fulmine` is the `fulmine` command."""

from fulmine.cli import main

raise SystemExit(main())
