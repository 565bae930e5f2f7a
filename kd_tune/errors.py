"""The errors kd-tune shows to users: one clear line each, no traceback unless --debug."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run on), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class KdTuneError(Exception):
    """An error whose message is meant for the user. ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class UsageError(KdTuneError):
    """Bad input from the user (a flag, a name, a search space): exit status 2, nothing started."""

    exit_code = 2


class SpaceError(UsageError):
    """A search-space file that is malformed; the message names the file, key, value and what is allowed."""

    def __init__(self, source: str, key: str, value: object, allowed: str) -> None:
        self.source, self.key, self.value, self.allowed = source, key, value, allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        where = f"key '{key}'" if key else "top level"
        super().__init__(f"{source}: {where}: bad value {shown}; allowed: {allowed}")


class FlagError(UsageError):
    """A bad command-line flag or argument (or the environment variable standing for it): the message
    names the flag, the value and what is allowed, as :class:`SpaceError` does for a search-space key.

    ``problem`` says what is wrong when "not allowed" is not enough; a problem phrased as a predicate
    ("is a folder that ...") follows the value directly, any other after a colon.
    """

    def __init__(self, flag: str, value: object, allowed: str, problem: str = "") -> None:
        self.flag, self.value, self.allowed, self.problem = flag, value, allowed, problem
        if not problem:
            said = ":"
        elif problem.startswith(("is ", "has ")):
            said = f" {problem};"
        else:
            said = f": {problem};"
        super().__init__(f"{flag} {value!r}{said} allowed: {allowed}")


class TrackingUnavailableError(KdTuneError):
    """The MLflow store cannot be reached (a server down, a database away) when a command needs it now;
    the message says what was not done."""


class DataUnavailableError(KdTuneError):
    """A dataset's files are not on disk and could not be fetched from any source."""


class DivergedError(RuntimeError):
    """Training produced a NaN or infinite loss; the trial stops instead of wasting its budget."""

    def __init__(self, epoch: int, loss: float) -> None:
        self.epoch, self.loss = epoch, loss
        super().__init__(f"training diverged at epoch {epoch}: loss = {loss}")
