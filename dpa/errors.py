"""The one exception type for user mistakes; the CLI turns it into exit code 1 and one line."""


class DpaError(Exception):
    """A problem the user can fix (missing file, wrong size, absent optional package).

    The message says what went wrong and what to do about it.
    """


def require_module(module: str, package: str, purpose: str):
    """Import an optional dependency or raise DpaError naming the package to install.

    module: import name (e.g. "gi"); package: what to install (e.g. "PyGObject");
    purpose: what needed it (e.g. "GStreamer input").
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise DpaError(f"{purpose} needs the optional package '{package}' ({error}); install it first") from error
