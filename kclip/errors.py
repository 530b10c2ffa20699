"""The one line between a user's mistake and a bug.

:class:`UserError` is an error the user caused and can fix: a config key, a data file, a model that is not
there, an output made from other inputs. The command line prints its message on one line (``kclip: ...``) and
exits non-zero without a traceback; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave kclip; the message names the key, file or row and says what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config names (pairs, shards, an evaluation dataset, an earlier stage's output)
    is not there; the message names it, the config key or command, and what to do."""
