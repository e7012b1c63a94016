"""How the `fleet` commands print: one JSON document per line, or rich tables."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def console() -> Console:
    from rich.console import Console

    # Piped output has no terminal width: do not squeeze long model ids into 80 columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)
