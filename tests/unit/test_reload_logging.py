"""A reload's ``logging`` section re-applied to the CLI's log setup (proxy.cli)."""

from __future__ import annotations

import logging

from proxy.cli import JsonFormatter, reconfigure_logging, setup_logging
from proxy.config import LoggingConfig


def test_reconfigure_logging_changes_level_and_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    listener = setup_logging(LoggingConfig(format="json", level="info"))
    try:
        [handler] = listener.handlers
        assert isinstance(handler.formatter, JsonFormatter)
        assert root.level == logging.INFO
        reconfigure_logging(listener, LoggingConfig(format="text", level="warning"))
        assert root.level == logging.WARNING
        assert handler.formatter is not None
        assert not isinstance(handler.formatter, JsonFormatter)
        reconfigure_logging(listener, LoggingConfig(format="json", level="debug"))
        assert root.level == logging.DEBUG and isinstance(handler.formatter, JsonFormatter)
    finally:
        listener.stop()
        root.handlers[:], level = saved
        root.setLevel(level)
