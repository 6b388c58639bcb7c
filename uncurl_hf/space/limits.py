"""What one request of the Space may ask (input length, batch size) and how long it may take (:class:`Deadline`).

The limits keep one request from tying up the shared CPU; each check raises an :class:`~uncurl_hf.errors.UncurlError`
whose message is what the page shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from uncurl_hf.errors import RequestTimeoutError, SpaceInputError

MAX_INPUT_CHARS = 1000
MAX_BATCH = 200
REQUEST_TIMEOUT_S = 60.0  # processing budget of one request (Compare or Batch), after it leaves the queue
MAX_QUEUE = 64  # requests waiting beyond this are refused at once by Gradio ("queue is full"), not kept forever

EMPTY_INPUT_MESSAGE = "The input is empty: type a sentence or pick one of the examples below."


@dataclass
class Deadline:
    """The time budget of one request, checked between model runs (Python cannot interrupt a running forward).

    A budget of ``None`` never expires. Checks sit where a request can stop cleanly: after loading models, before
    each model run, between batch examples; ``generate`` gets the remaining time as ``max_time``. A single forward
    of the largest input is far shorter than any sensible budget, so the overrun past the budget is one forward.
    """

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)

    def remaining(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.perf_counter() - self.start)

    def check(self, stage: str) -> None:
        left = self.remaining()
        if left is not None and left <= 0:
            raise RequestTimeoutError(
                f"The request took longer than its {self.seconds:g} s limit and was stopped ({stage}). Try a shorter "
                "input or fewer examples, or start the demo with a larger --request-timeout."
            )


def too_long_message(length: int) -> str:
    return (
        f"The input is {length} characters long; the limit is {MAX_INPUT_CHARS} characters. "
        "Shorten it: the cap keeps one request from tying up the shared CPU."
    )


def check_text(text: str | None) -> str:
    """The stripped input, or :class:`SpaceInputError` with the message the page shows (empty / too long)."""
    stripped = (text or "").strip()
    if not stripped:
        raise SpaceInputError(EMPTY_INPUT_MESSAGE)
    if len(stripped) > MAX_INPUT_CHARS:
        raise SpaceInputError(too_long_message(len(stripped)))
    return stripped


def check_batch_size(n: float | int | None) -> int:
    """``n`` as an int in ``[1, MAX_BATCH]``, or :class:`SpaceInputError`: a batch run must stay interactive."""
    try:
        value = float(n)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not value.is_integer() or not 1 <= value <= MAX_BATCH:
        raise SpaceInputError(f"The number of examples must be a whole number from 1 to {MAX_BATCH}; got {n!r}.")
    return int(value)
