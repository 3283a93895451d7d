"""Named, strongly referenced background tasks.

A bare ``asyncio.create_task`` result can be garbage-collected mid-flight and its exception
lost; ``spawn`` keeps a reference until the task ends and logs an unexpected failure with
the task's name, so that nothing fails silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

_running: set[asyncio.Task[Any]] = set()


def _done(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start ``coro`` as a task called ``name``; it is referenced until it ends."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_done)
    return task
