"""Progress bars (rich, on stderr): how every long stage shows its progress.

A bar whose work fails is cleared instead of drawn one last time, so a failed stage leaves
its one error line on stderr, whether stderr is a terminal, a file or a pipe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import Progress


@contextlib.contextmanager
def shown(progress: Progress) -> Iterator[Progress]:
    """`with progress:`, leaving no bar behind when the block raises."""
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True
            raise
