"""Domain errors. The gRPC layer maps each to its own status code in one place."""
from __future__ import annotations

import errno


class FedError(Exception):
    """Base of the errors a caller can act on; the message says what to do."""


class NotFoundError(FedError):
    """An envoy, experiment or model that does not exist."""


class InvalidRequestError(FedError):
    """A malformed request: bad tensor, bad header, bad name."""


class AlreadyExistsError(FedError):
    """A name that is already taken."""


class PermissionDeniedError(FedError):
    """An authenticated peer asking for something its certificate does not allow."""


class PreconditionError(FedError):
    """A request that is well formed but not valid now (wrong round, not a collaborator...)."""


class StorageError(FedError):
    """The director could not store something: its disk is full. Nothing half-written is kept."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota reached, file size limit


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that means no more bytes fit (no space, quota reached, file size limit)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS
