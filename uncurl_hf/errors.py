"""Error types. Every user-facing failure is an :class:`UncurlError` whose message names the fix.

The CLI catches ``UncurlError`` and prints only its message (no traceback unless ``--debug``), so a
message must stand on its own: say what is wrong, with which input, and what to do instead.
"""

from __future__ import annotations


class UncurlError(Exception):
    """Base class of every error uncurl-hf raises on purpose."""

    exit_code: int = 2


class ModelNotFoundError(UncurlError):
    """The model path does not exist or does not hold a loadable checkpoint."""


class UnsupportedModelError(UncurlError):
    """The checkpoint is not a sparse MoE model of a registered family."""


class InvalidFactorError(UncurlError):
    """The pruning factor or the per-layer counts cannot be realised."""


class InvalidPlanError(UncurlError):
    """A pruning plan is malformed or does not fit the model it is applied to."""


class CalibrationDataError(UncurlError):
    """The calibration data is missing, empty or unreadable."""


class UnknownTaskError(UncurlError):
    """The task name is not in the task registry."""


class UnknownMethodError(UncurlError):
    """The pruning method name is not in the method registry."""


class OutputExistsError(UncurlError):
    """The output directory exists (or equals the input) and overwriting was not requested."""


class CheckpointError(UncurlError):
    """A checkpoint could not be read or written (corrupt shard, missing file, write failure)."""


class ExportError(UncurlError):
    """The requested export format cannot represent the pruned model (e.g. stock export of unequal counts)."""


class HubError(UncurlError):
    """Pushing to (or talking with) a Hugging Face Hub endpoint failed; the local output is left untouched."""


class HubAuthError(HubError):
    """No token was found, or the Hub rejected it."""


class RepoExistsError(HubError):
    """The target Hub repository exists and neither ``exist_ok`` nor ``overwrite`` was given."""


class HubConnectionError(HubError):
    """The Hub endpoint could not be reached (connection refused, DNS failure, timeout, offline mode)."""


class RemoteCodeError(UncurlError):
    """The checkpoint needs Python code shipped with it (``auto_map``) and ``--trust-remote-code`` was not given."""


class VerificationError(UncurlError):
    """``uncurl verify`` found an output folder that does not match what was written (hashes, counts, forward)."""

    exit_code = 1


class RecoveryError(UncurlError):
    """A recovery run cannot start or finish (bad settings, missing ``peft``, not a pruned folder)."""


class MaxDropError(UncurlError):
    """``--max-drop`` cannot be used as asked (missing task, conflicting options, no dev split)."""


class SpaceInputError(UncurlError):
    """What the user typed or picked cannot be run (empty, too long, batch size out of range, unknown model)."""


class RequestTimeoutError(SpaceInputError):
    """A request used up its processing budget (:data:`REQUEST_TIMEOUT_S` by default) and was stopped."""


class SweepError(UncurlError):
    """A sweep cannot run as asked (bad factors, split, metric, or output folder)."""


class DeviceError(UncurlError):
    """The requested device or dtype cannot be used here (no CUDA / MPS, a GPU index out of range, no accelerate)."""


class AccessDeniedError(CheckpointError):
    """A file or folder uncurl-hf must read or write is not accessible to this user (permission bits, a read-only
    filesystem)."""


class BrokenSymlinkError(CheckpointError):
    """A checkpoint file is a symlink that leads nowhere: a loop, or a target that does not exist."""


class ZooModelNotBuiltError(ModelNotFoundError):
    """A zoo model is neither shipped with the package nor in the cache; ``uncurl zoo build NAME`` trains it."""


class EvaluationError(UncurlError):
    """A model, task or option that evaluation cannot score as asked (the message names what to change)."""


class PromptError(EvaluationError, ValueError):
    """No prompt for a task, or a prompt that does not fit the model (also a ``ValueError`` for older callers)."""
