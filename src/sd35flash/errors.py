"""User-facing errors.

Anything the user can fix (a missing folder, a malformed spec, a bad flag) is raised as a
:class:`UserError`. The CLI prints its message on one line and exits non-zero, without a traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls. The message says what is wrong and what to do."""


class SpecError(UserError):
    """A scene spec (JSON / JSONL) is malformed."""


class ConfigError(UserError):
    """A config file or override is malformed (unknown key, wrong type, bad value)."""


class TrainingAlarm(UserError):
    """Training stopped on purpose: NaN/inf, or collapse. The last good checkpoint is kept."""


class NonFiniteError(UserError):
    """A model produced NaN or inf (latents, images): its weights are damaged or diverged, or an input was."""


class StopTraining(Exception):
    """A training run stopped early on purpose, right after a checkpoint (``stop_at``, ``--time-limit``,
    SIGTERM/SIGUSR1); ``--resume`` continues it. Not an error: the CLI exits with status 75."""
