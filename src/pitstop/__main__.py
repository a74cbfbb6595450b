"""``python -m pitstop``: the ``pitstop`` command line."""

from __future__ import annotations

from ._cli import main

main()
