"""The two kinds of stop a job can make on purpose.

`UserError` is a mistake a user can fix (a bad value, a missing file): its message is one sentence
that says what to do, and the runner prints it without a traceback. `SkipJob` is not a mistake: the
job cannot run here (e.g. a task's training split is not available locally) and writes a `skipped`
record that says how to get what is missing, so the rest of a sweep goes on.
"""


class UserError(Exception):
    """A mistake in the config or the input that the user can fix; the message says how."""


class SkipJob(Exception):
    """The job cannot run on this machine; the message says what is missing and how to get it."""
