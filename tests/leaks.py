"""A pytest plugin that reads every log line of the whole run (this process's, and the log files
of the servers tests start) and fails the run if one holds an API key, an access token or a
password a test used."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

# What textgen's secrets look like: its API keys, and JWTs (a JSON header and payload).
SHAPES = re.compile(
    r"tg-[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{43}|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[\w-]*"
)
# Passwords the tests send (they have no recognisable shape).
PASSWORDS: set[str] = set()


def remember_password(password: str) -> str:
    PASSWORDS.add(password)
    return password


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is not a leak
            pass


HANDLER = Everything()


def pytest_configure(config: pytest.Config) -> None:
    root = logging.getLogger()
    root.addHandler(HANDLER)
    # What the service logs at its default level, INFO, at least.
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def leaks(text: str) -> list[str]:
    found = [match.group(0)[:12] + "..." for match in SHAPES.finditer(text)]
    return found + [f"password {p[:3]}..." for p in PASSWORDS if p in text]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    logging.getLogger().removeHandler(HANDLER)
    sources = {"this process's logs": "\n".join(HANDLER.lines)}
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        for log in Path(factory.getbasetemp()).rglob("*.log"):
            sources[str(log)] = log.read_text(errors="replace")
    found = {where: hits for where, text in sources.items() if (hits := leaks(text))}
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "secrets reached the logs: " + "; ".join(
            f"{where}: {', '.join(hits[:5])}" for where, hits in found.items()
        )
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
