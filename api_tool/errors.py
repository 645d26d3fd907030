"""Every exception the package raises, in one place.

All of them derive from :class:`ApiPromptingError`. Problems with what the caller passed in also
derive from :class:`ValueError`, so ``except ValueError`` keeps working for callers that do not
know this package's classes. Each message names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class ApiPromptingError(Exception):
    """Base class of every error raised by ``api_tool`` and ``agents``."""


class ImageLoadError(ApiPromptingError, ValueError):
    """An image reference could not be turned into a usable RGB image."""


class ImageNotFoundError(ImageLoadError):
    """The image path does not exist or is not a file."""


class NotAnImageError(ImageLoadError):
    """The bytes, file or string are not an image format Pillow can decode."""


class TruncatedImageError(ImageLoadError):
    """The image file is cut short or corrupt and cannot be decoded completely."""


class ImageTooLargeError(ImageLoadError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class EmptyImageError(ImageLoadError):
    """The image has zero width or zero height."""


class RemoteImageNotAllowedError(ImageLoadError):
    """An http(s) URL was given but remote loading was not enabled."""


class ImagePathNotAllowedError(ImageLoadError):
    """A file path came from a model (a tool argument) and lies outside the directories the tool may read."""


class InvalidQueryError(ApiPromptingError, ValueError):
    """The text query is empty, blank or not a string."""


class InvalidParameterError(ApiPromptingError, ValueError):
    """A numeric or named option is outside its allowed values (kernel size, style, combine mode...)."""


class OutputPathError(InvalidParameterError):
    """The output path cannot be written: it is the input image, a directory, or has no image format."""


class DeviceUnavailableError(InvalidParameterError):
    """The requested torch device (``cuda``, ``mps``, ``cuda:3``...) does not exist on this machine."""


class UnknownModelError(ApiPromptingError, ValueError):
    """The model name is not known to open_clip / transformers nor an existing local path."""


class UnsupportedModelError(ApiPromptingError, ValueError):
    """The model exists but its architecture cannot be attributed by this backend."""


class LayerOutOfRangeError(ApiPromptingError, ValueError, IndexError):
    """The requested transformer block index does not exist in the model."""


class WeightsUnavailableError(ApiPromptingError, RuntimeError):
    """Pretrained weights are neither cached locally nor downloadable (offline machine)."""


class ImageTokenError(ApiPromptingError, ValueError):
    """The LVLM prompt holds no image tokens, or a number that does not form the vision grid."""


class FocusNotFoundError(ApiPromptingError, ValueError):
    """The ``focus`` substring does not occur in the answer whose attention is averaged."""


class DatasetError(ApiPromptingError, ValueError):
    """An evaluation dataset is missing, malformed (bad JSON, missing or mistyped fields) or points at
    images that do not exist; the message names the file and the line."""


class EvalOutputError(ApiPromptingError, ValueError):
    """The evaluation output directory holds results that do not belong to this run (another target or
    attributor, or earlier results without ``--resume``)."""


class EvalOutputLockedError(EvalOutputError):
    """Another evaluation run is writing to the same output directory; the message names its process."""


class EvalRunError(ApiPromptingError, RuntimeError):
    """The evaluated model (or the attributor) failed on some questions; every answer obtained before the
    failure is saved, and ``--resume`` continues the run."""


class TargetUnavailableError(ApiPromptingError, ValueError):
    """A served target (``openai:MODEL@BASE_URL``, ``ollama:MODEL@HOST``) is misconfigured, cannot be reached
    or does not serve the model; the message says what to set."""


class EngineUnavailableError(ApiPromptingError, RuntimeError):
    """The Ray engine cannot run: Ray is not installed, or the cluster at the given address cannot be joined."""


class DemoModelWarning(UserWarning):
    """A demo model (trained only on synthetic scenes of coloured shapes) was used on an image the user
    brought, where its maps mean little; the message says how to use a real model. Shown once per process."""
