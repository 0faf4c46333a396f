"""`python -m nlakit`: the nlakit CLI."""

from nlakit.run.cli import main

raise SystemExit(main())
