"""The one exception type the entry points print as a single line instead of a traceback."""


class UserError(ValueError):
  """Bad input or a workdir/data problem the user can fix: the message names it and the fix.

  Raised before anything is written where possible; `experiments.main` prints it as
  `error: <message>` and exits non-zero. Bugs stay ordinary exceptions, with tracebacks.
  """
