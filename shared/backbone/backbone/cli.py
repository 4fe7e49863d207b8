"""Running a pipeline's ``main`` as a command (``python -m pipelines.<domain>.<step>``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError,)


def run_cli(
    main: Callable[[list[str] | None], Any], expected: tuple[type[BaseException], ...] = EXPECTED_ERRORS
) -> NoReturn:
    """Exit with ``main``'s return code (0 when it returns something else, such as its metrics). An expected
    error (by default a missing artifact or data file; a domain adds its data errors) ends the command with
    its message on stderr and exit status 2, not a traceback; anything else still raises."""
    try:
        rc = main(None)
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(rc if isinstance(rc, int) else 0)
