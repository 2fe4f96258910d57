"""kvxfer's loggers: their records carry text, never the objects they were made from.

A log record may live far longer than the call that made it: pytest keeps every record
of a test until the test ends, ``logging.handlers.MemoryHandler`` and ``QueueHandler``
hold them until flushed, an engine may keep the last few for its error reports. A
record keeps its ``args`` and ``exc_info``, so ``log.debug("ended: %s", exc)`` keeps
the exception, its traceback, every frame on it and every local of those frames: a
UCX endpoint, a worker with its 11 file descriptors, a NIXL agent with its sockets.
With debug logging kept, each pair of ucx agents that connected and closed left 13 fds
behind (issue 18). So every kvxfer logger turns a record into text (message formatted,
traceback rendered) before any handler sees it; a record that is never emitted (below
the logger's level) is never made, and costs nothing.
"""

from __future__ import annotations

import logging

__all__ = ["get_logger"]

_TRACEBACKS = logging.Formatter()


class _TextOnly(logging.Filter):
    """Formats a record's message and traceback into text and drops the objects."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return True


_TEXT_ONLY = _TextOnly()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` whose records hold only text (see the module doc).

    Args:
        name: the logger's name, ``kvxfer`` or below it.

    Returns:
        The logger, with the filter attached once.
    """
    logger = logging.getLogger(name)
    if _TEXT_ONLY not in logger.filters:
        logger.addFilter(_TEXT_ONLY)
    return logger
