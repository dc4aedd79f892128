"""How storage fails, whatever the backend."""


class StorageUnavailable(OSError):
    """The blob store did not answer or refused the request (network, throttling, a 5xx, credentials): nothing was
    written or read; retry later. A missing blob is FileNotFoundError instead."""
