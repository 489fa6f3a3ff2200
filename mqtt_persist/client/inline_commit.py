"""What a durable ``publish()`` needs to commit from its own task (``Flusher.commit_inline``).

The flusher runs the inline commit itself; here are its parts that hold no flusher state: the
future the caller waits on, which a cancellation cannot cut short, and the rule for when a
store's ``begin_apply`` may stand in for its ``apply``.
"""

from __future__ import annotations

import asyncio

from mqtt_persist.errors import StoreError


class CommitFuture(asyncio.Future[None]):
    """The future an inline commit waits on; cancelling the task that waits does not cancel it.

    ``Task.cancel()`` first tries to cancel the future the task waits on. Here that fails, so
    the task is cancelled once the commit ended (at most one sync later), and the caller still
    learns whether its batch is durable. A cancelled future would hide that, and the batch's
    packets must go out if, and only if, it is.
    """

    def cancel(self, msg: object = None) -> bool:
        """Refuse: the commit runs on, and so does the wait for it."""
        return False


def outcome_into(durable: asyncio.Future[None], task: asyncio.Task[None]) -> None:
    """Resolve ``durable`` with the outcome of the ``apply`` task."""
    if durable.done():
        return
    if task.cancelled():
        durable.set_exception(StoreError("the commit was cancelled: its outcome is unknown"))
    elif (exc := task.exception()) is not None:
        durable.set_exception(exc)
    else:
        durable.set_result(None)


def pairs_apply(store: object) -> bool:
    """Whether ``store.begin_apply`` belongs with its ``apply``: set on the instance itself,
    or defined by the class that defines ``apply`` or by a subclass of it. A subclass (or a
    wrapper set on the instance) that replaces ``apply`` alone, to check or count commits,
    keeps every commit on ``apply``.
    """
    own = vars(store) if hasattr(store, "__dict__") else {}
    if "begin_apply" in own:
        return True
    if "apply" in own:
        return False

    mro = type(store).__mro__

    def owner(name: str) -> int:
        return next((i for i, cls in enumerate(mro) if name in vars(cls)), len(mro))

    # begin_apply from the class of apply, or from a subclass of it (which knows of both).
    return owner("begin_apply") <= owner("apply")
