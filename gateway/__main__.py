"""``python -m gateway``: the single entry point."""

from gateway.cli import main

raise SystemExit(main())
