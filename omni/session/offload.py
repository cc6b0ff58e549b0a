"""CPU-heavy work on client input (JSON parsing, base64 and image decoding), off the event loop.

One client's large messages must not stall every other call's events and paced audio, so
such work runs in a small thread pool shared by all sessions of the process. The pool is
bounded (`decode_threads`): a client sending many large images queues behind itself instead
of taking every thread; work items run in submission order.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# below this many bytes parsing inline is cheaper than the thread hop
OFFLOAD_BYTES = 64 * 1024


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="omni-decode")


async def off_loop(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on the shared decode pool of `threads` threads."""
    return await asyncio.get_running_loop().run_in_executor(_pool(threads), fn, *args)
