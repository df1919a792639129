"""The errors that end a run in one line on stderr (no traceback): the recipe's scripts catch these."""

from tv_lossfix import LossConfigError

from checks import DataError
from models import ModelError
from train_config import ConfigError
from training_checkpoint import CheckpointError

# LossConfigError can come from building the model (a class_weight of another length than the model's classes).
USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelError, LossConfigError)
