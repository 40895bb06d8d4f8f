"""One error type for bad input: the CLI prints its message as one line and exits with code 2."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input the user can fix. The message says what is wrong and how to fix it."""

    exit_code = 2


# what the machine, not the input or the code, did wrong: a full disk or quota, a read-only or
# forbidden folder, a path through a file
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def machine_error(exc: OSError) -> UserError | None:
    """The one-line UserError for an OSError the machine caused, or None for any other (a bug,
    whose traceback says where)."""
    if exc.errno not in MACHINE_ERRNOS:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return UserError(
        f"{exc.strerror or exc}{where}; make room on that disk or choose a folder you can write (--home, --out)"
    )
