"""The project's exceptions: each message says what is wrong, where (file or URL), and the fix."""


class TopoflowError(Exception):
    """Base class of errors a user can act on (the CLI prints them without a traceback)."""


class ConfigError(TopoflowError):
    """A setting is missing or invalid."""


class BadInputError(TopoflowError):
    """An input file cannot be used: not ROOT, truncated, missing tree or branch, bad values."""

    def __init__(self, url: str, problem: str, fix: str = ""):
        self.url, self.problem, self.fix = url, problem, fix
        text = f"{problem}\nin file {url}"
        if fix:
            text += f"\n{fix}"
        super().__init__(text)

    def __reduce__(self):  # keep the fields when Spark pickles the error back to the driver
        return (type(self), (self.url, self.problem, self.fix))


class StorageError(TopoflowError):
    """Storage cannot be reached or refuses access (XRootD, S3, local permissions)."""
