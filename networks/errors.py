"""Errors of a configuration, raised while the networks and methods are built: the command line
reports them in one line, before any work."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the option and the way out."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file named by an option does not exist."""
