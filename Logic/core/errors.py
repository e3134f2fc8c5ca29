"""The one exception type users see: a readable sentence, no traceback (unless ``--verbose``)."""


class DafneError(Exception):
    """An error caused by the user's input or environment, stated as one readable sentence."""


class InputError(DafneError):
    """Unusable input image, label map or segmentation."""


class ModelError(DafneError):
    """A model package that is missing, malformed or does not match its manifest."""


class Cancelled(DafneError):
    """The user cancelled a long-running operation."""
