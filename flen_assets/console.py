"""What a run in a `flen` process prints on the terminal, and whether it shows stack traces.

`flen --debug` (or FLEN_DEBUG=1) shows traces; without it a failed step is one line. Either way
Dagster keeps the whole trace in the run's event log (the Dagster UI, Runs > the run's id): the
console logger only decides what reaches the terminal, the instance's own log handler stores every
event in full.
"""

from __future__ import annotations

import logging

import dagster as dg
from dagster._core.log_manager import LOG_RECORD_METADATA_ATTR, _error_str_for_event
from dagster._utils.log import create_console_logger

CONSOLE_LOGGER = "flen_console"
_traces = False


def show_traces(on: bool) -> None:
    """Set by the CLI's --debug: runs started by this process print their traces on the terminal."""
    global _traces
    _traces = on


def traces_shown() -> bool:
    return _traces


def console_loggers(log_level: str = "INFO") -> dict:
    """The `loggers` section of the run config of a run this process executes."""
    return {CONSOLE_LOGGER: {"config": {"log_level": log_level, "traces": _traces}}}


class _WithoutTraces(logging.Filter):
    """Leaves out ERROR records (a failed step, the steps it kept from running, the failed run: `flen`
    reports each failed step in one line, with its cause) and cuts the error (message, stack trace,
    causes) off any other Dagster event that carries one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        meta = getattr(record, LOG_RECORD_METADATA_ATTR, None)
        event = meta.get("dagster_event") if isinstance(meta, dict) else None
        error = _error_str_for_event(event) if event is not None else None
        message = record.getMessage()
        if error and message.endswith(error):
            record.msg, record.args = message[: -len(error)], ()
        return True


@dg.logger(
    {
        "log_level": dg.Field(str, is_required=False, default_value="INFO", description="The logger's threshold."),
        "name": dg.Field(str, is_required=False, default_value="dagster"),
        "traces": dg.Field(bool, is_required=False, default_value=True,
                           description="Print the stack trace of a failed step (the event log keeps it anyway)."),
    },
    description="Dagster's colored console logger; without `traces`, a failed step's event is one line.",
)
def flen_console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    config = init_context.logger_config
    logger = create_console_logger(config["name"], config["log_level"].upper())
    if not config["traces"]:
        for handler in logger.handlers:
            handler.addFilter(_WithoutTraces())
    return logger
