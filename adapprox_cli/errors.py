"""One exception family for the whole library; the CLI turns it into a one-line message."""


class AdapproxError(Exception):
    """Base class: a problem the user can fix. The message names the problem and the fix."""

    exit_code = 1


class InputError(AdapproxError):
    """Bad, corrupt, unreadable or unsupported input (a checkpoint, a file, an option value)."""

    exit_code = 2


class ParameterError(InputError):
    """A bad argument value, told in the terms of whoever passed it.

    ``template`` names the parameter as ``{name}``: from Python the message reads
    ``power_iters must be >= 0, got -1``, and the CLI, which knows that ``compare_methods``'s
    ``power_iters`` is its ``--iters``, prints ``--iters must be >= 0, got -1`` through
    ``spelled_by(...)``. Not a ``ValueError``: the loaders turn a ValueError from inside a malformed
    container into "does not have the structure its format implies", which a bad argument is not.
    """

    def __init__(self, parameter: str, template: str, *, mentions: tuple[str, ...] = ()):
        self.parameter = parameter
        self.template = template
        # Other parameters the message suggests, each written as {its_name} in the template
        # ("pass {resume} to continue it"), so the CLI can name their flags too.
        self.mentions = mentions
        super().__init__(self.spelled_by(lambda parameter: parameter))

    def spelled_by(self, spell) -> str:
        """The message with every parameter it names spelled by ``spell(python_name)``.

        Only the exact tokens ``{name}`` and ``{<mention>}`` are replaced: text from the user
        embedded in the template stays as it is unless it holds such a token literally.
        """
        text = self.template.replace("{name}", spell(self.parameter))
        for parameter in self.mentions:
            text = text.replace("{" + parameter + "}", spell(parameter))
        return text


class UnsafeCheckpointError(InputError):
    """A checkpoint needs pickled globals outside the allowlist; loading it would run its code."""


class UnsupportedStateError(InputError):
    """The optimizer state is not one adapprox reads (SGD, Adafactor, 8-bit, sharded pieces...)."""


class StateMismatchError(InputError, ValueError):
    """An optimizer state that does not fit the parameters it is loaded into (a ValueError, as
    ``torch.optim.Optimizer.load_state_dict`` raises for a mismatched state dict)."""


class OutputError(InputError, OSError):
    """An output could not be written (no space, no permission, a target it must not replace).

    Also an ``OSError`` (with the original ``errno``), so code that handles I/O failures the
    Python way keeps working; the message names the target, never a temporary file.
    """

    def __str__(self) -> str:  # OSError would print "[Errno N] ..." once errno is set
        return str(self.args[0]) if self.args else ""
