"""One exception family. Every message names the bad thing and says what to do."""


class FfcError(Exception):
    """Base class of every error ffc raises on purpose."""


class ModelNotFoundError(FfcError):
    pass


class UnsupportedModelError(FfcError):
    pass


class UnsupportedOpError(FfcError):
    pass


class PassError(FfcError):
    pass


class ArtifactError(FfcError):
    pass


class InvalidRequestError(FfcError, ValueError):
    pass
