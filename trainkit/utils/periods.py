"""The one rule of every periodic hook: does a period fire at this iteration?"""
from typing import Optional

__all__ = ["period_fires"]


def period_fires(period: int, iteration: int, max_iter: Optional[int]) -> bool:
    """Whether something done every ``period`` iterations happens after ``iteration``.

    It fires after iterations ``period - 1``, ``2 * period - 1``, ... (never when ``period`` is 0) and after the
    last iteration, ``max_iter - 1`` (unless ``max_iter`` is None).

    Example: ``period_fires(20, 19, 50)``, ``period_fires(20, 49, 50)`` and ``period_fires(0, 49, 50)`` are
    true; ``period_fires(20, 20, 50)`` and ``period_fires(20, 49, None)`` are not.
    """
    return (period > 0 and (iteration + 1) % period == 0) or (max_iter is not None and iteration == max_iter - 1)
