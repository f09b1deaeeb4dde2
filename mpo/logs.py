"""Python logging for the ``mpo`` and ``reward`` commands: one format, one level switch.

``--verbose`` shows DEBUG messages of this project (and the libraries' INFO), ``--quiet`` only
warnings and errors, and turns progress bars off (``TQDM_DISABLE``); the default is INFO. Modules
log through :func:`get_logger`, which is accelerate's multi-process logger once an accelerate state
exists (a message is written by the main process only unless ``main_process_only=False``) and a
plain logger before that, so the same call works in ``mpo recipe`` and under ``accelerate launch``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

PROJECT_LOGGERS = ("mpo", "reward")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


def setup_logging(verbosity: str = "normal") -> int:
    """Configure the project's loggers (and the libraries' verbosity); returns the level set."""
    level = LEVELS[verbosity]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    library = {"quiet": "error", "normal": "warning", "verbose": "info"}[verbosity]
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            lib = __import__(module, fromlist=["set_verbosity"])
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        lib.set_verbosity(getattr(lib, library.upper()))
    if verbosity == "quiet":
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it for every bar created after this
    return level


class _ProcessAware(logging.LoggerAdapter):
    """accelerate's MultiProcessAdapter when accelerate's state is up, the plain logger before."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(name), {})
        self._accelerate: Any = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        from accelerate.state import PartialState

        if PartialState._shared_state:  # initialised: only the main process speaks by default
            if self._accelerate is None:
                from accelerate.logging import get_logger as accelerate_logger

                self._accelerate = accelerate_logger(self.logger.name)
            self._accelerate.log(level, msg, *args, **kwargs)
            return
        kwargs.pop("main_process_only", None)
        kwargs.pop("in_order", None)
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> logging.LoggerAdapter:
    """The logger for module ``name`` (pass ``__name__``)."""
    return _ProcessAware(name)
