"""One error type for bad input: the CLI prints its message as one line and exits with code 2."""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """Bad input the user can fix. The message says what is wrong and how to fix it."""

    exit_code = 2


def did_you_mean(name: str, known) -> str:
    """' (did you mean 'gamma'?)' for a misspelt name close to one of `known`; '' when none is close
    (stdlib difflib: its ratio, at the cutoff git and argparse-style tools use for suggestions)."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# what the machine, not the input or the code, did wrong: a full disk or quota, a read-only or
# forbidden folder, a path through a file
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


# how Rust's std::io::Error ends its text: libraries written in Rust (safetensors, tokenizers) raise
# their own exception types, not OSError, on a full disk ("... No space left on device (os error 28)")
_RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, or one rebuilt from a Rust library's "(os error N)" text."""
    if isinstance(exc, OSError):
        return exc
    found = _RUST_IO_ERROR.search(str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def machine_error(exc: BaseException) -> UserError | None:
    """The one-line UserError for an error the machine caused (a full disk, a read-only folder),
    whether an OSError or a Rust library's I/O error; None for any other (a bug, whose traceback
    says where)."""
    os_error = os_error_of(exc)
    if os_error is None or os_error.errno not in MACHINE_ERRNOS:
        return None
    where = f": {os_error.filename}" if os_error.filename else ""
    return UserError(
        f"{os_error.strerror or os_error}{where}; make room on that disk or choose a folder you can write "
        "(--home, --out)"
    )
