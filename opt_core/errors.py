"""Error types shared by every part of the project.

Each error names the thing that is wrong (a file, a tensor, a token id, a length) so that a user can fix it
without reading a framework's traceback. The framework packages (`opt_torch`, `opt_tf`, `opt_flax`) raise these
same classes.
"""


class OPTError(ValueError):
    """Base class of every error this project raises on bad input."""


class ConfigError(OPTError):
    """A configuration value is missing, of the wrong type, or inconsistent with another."""


class CheckpointError(OPTError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the configuration."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint asks to import or call something other than tensor storage."""


class InputError(OPTError):
    """Model inputs are malformed: token ids out of range, too long, or mismatched shapes."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (the disk is full, a file is over the size limit, an I/O error); the message
    names the folder and the file, and whether the folder still holds its previous checkpoint.

    Also an OSError, with the failed write's `errno`, so code that handles OSError from a save keeps working.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno
