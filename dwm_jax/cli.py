"""What every command-line entry point shares: a user's mistake is one line on stderr and
exit status 2, never a traceback.

``parse_flags_or_exit(prog)`` wraps absl's flag parsing (unknown ``--config.<field>``
overrides, unparsable values, config files that fail to load); ``FILE_ERRORS`` are the
file-system errors that are the user's to fix (a read-only or missing directory, a file
where a directory belongs).
"""

from __future__ import annotations

import sys

# the file system refusing what the user asked (fix the path or its permissions)
FILE_ERRORS = (PermissionError, NotADirectoryError, IsADirectoryError, FileNotFoundError,
               FileExistsError)


def fail(prog: str, message: str) -> int:
    """Prints ``prog: error: message`` on stderr; returns 2, the exit status of a user error."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def describe_os_error(e: OSError) -> str:
    """'<path>: <reason>' for an OSError, without Python's '[Errno N]' prefix."""
    where = e.filename if e.filename is not None else ""
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def _overrides(argv: list[str], config_flags) -> list[str]:
    """The ``--<config flag>.<field>`` overrides in ``argv``, without their values."""
    return [a.split("=")[0] for a in argv[1:]
            if any(a.startswith(f"--{c}.") for c in config_flags)]


def _unknown_field(prog: str, error: Exception, argv: list[str], config_flags) -> None:
    name = str(error).strip("\"'")
    for flag in _overrides(argv, config_flags):
        path = flag.split(".")[1:]
        if name in path:   # the field up to the first name the config lacks
            field = ".".join(path[:path.index(name) + 1])
            fail(prog, f"{flag}: the config has no field {field!r}")
            return
    fail(prog, f"--{config_flags[0]}.<...>.{name}: the config has no field {name!r}")


def _repeated_override(argv: list[str], config_flags) -> str | None:
    """The first ``--<config flag>.<field>`` given more than once (absl would join a tuple
    field's values or keep the last one silently)."""
    seen = set()
    for flag in _overrides(argv, config_flags):
        if flag in seen:
            return flag
        seen.add(flag)
    return None


def define_config_file(prog: str, name: str, default: str, help_text: str):
    """``config_flags.DEFINE_config_file``, with a one-line error and exit 2 when an override
    of the default file names no field (absl applies those while defining the flag)."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file(name, default, help_text)
    except (AttributeError, KeyError) as e:
        _unknown_field(prog, e, sys.argv, (name,))
        sys.exit(2)


def flags_parser(prog: str, config_flags: tuple[str, ...] = ("config",)):
    """An absl ``flags_parser`` for ``app.run``: absl's parsing, with a one-line error and
    exit 2 for a flag absl rejects, an override ``--<config flag>.<field>`` that names no
    field, and a config file that fails to load."""
    from absl import flags

    def parse(argv):
        repeated = _repeated_override(argv, config_flags)
        if repeated:
            fail(prog, f"{repeated} is given more than once; give it once")
            sys.exit(2)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # a config file's own exception arrives with its traceback
            lines = [line for line in str(e).splitlines() if line.strip()]
            message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
            fail(prog, message)
        except (AttributeError, KeyError) as e:
            _unknown_field(prog, e, argv, config_flags)
        sys.exit(2)
    return parse
