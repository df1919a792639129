"""The errors that end a run in one line on stderr (no traceback): the recipe's scripts catch these."""

import re
import sys
from typing import Callable

from tv_lossfix import LossConfigError

from checks import DataError
from models import ModelError
from train_config import ConfigError
from training_checkpoint import CheckpointError

# LossConfigError can come from building the model (a class_weight of another length than the model's classes).
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelError, LossConfigError)


def error_line(e: BaseException) -> str:
    """A user error's message. One raised in a DataLoader worker arrives wrapped in the worker's
    traceback (torch's ExceptionWrapper): the original message is what follows its "Type: " line."""
    msg = str(e)
    if msg.startswith("Caught ") and "Original Traceback" in msg:
        found = re.search(rf"^(?:[\w.]+\.)?{type(e).__name__}: ", msg, re.M)
        if found:
            msg = msg[found.end() :].rstrip()
    return msg


def run_cli(main: Callable[[], int]) -> int:
    """``main`` as a command, the one wrapper of every script here: a user error ends it in one line on
    stderr with exit code 1, never a traceback."""
    try:
        return main()
    except USER_ERRORS as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
