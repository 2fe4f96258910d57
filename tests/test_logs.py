"""kvxfer.logs: a kept record holds text, never the objects it was made from."""

from __future__ import annotations

import gc
import logging
import weakref

from kvxfer.logs import get_logger


class Resource:
    """Stands for a UCX endpoint or a NIXL agent: what a kept record must not keep."""


def _fail_with(resource: Resource) -> None:
    raise RuntimeError(f"peer gone ({type(resource).__name__})")


def test_a_kept_record_holds_neither_its_args_nor_its_traceback() -> None:
    kept: list[logging.LogRecord] = []
    keeper = logging.Handler()
    keeper.emit = kept.append  # type: ignore[method-assign]
    log = get_logger("kvxfer.test_logs")
    log.addHandler(keeper)
    log.setLevel(logging.DEBUG)
    try:
        resource = Resource()
        alive = weakref.ref(resource)
        try:
            _fail_with(resource)
        except RuntimeError as exc:
            log.debug("connection ended: %s (%r)", exc, resource)
            log.exception("the serve thread failed")
        del resource
        gc.collect()
    finally:
        log.removeHandler(keeper)
        log.setLevel(logging.NOTSET)
    assert alive() is None, "a kept record keeps the object alive"
    first, second = kept
    assert first.getMessage().startswith("connection ended: peer gone (Resource) (<")
    assert first.args is None and second.exc_info is None
    assert "RuntimeError: peer gone" in second.exc_text
    assert "RuntimeError: peer gone" in logging.Formatter().format(second)


def test_the_filter_is_attached_once() -> None:
    a = get_logger("kvxfer.test_logs_once")
    b = get_logger("kvxfer.test_logs_once")
    assert a is b and len(a.filters) == 1


def test_every_kvxfer_module_logs_through_it() -> None:
    """A module that makes its logger with logging.getLogger would bring the leak back."""
    import pathlib
    import re

    import kvxfer

    root = pathlib.Path(kvxfer.__file__).parent
    made_plain = re.compile(r"^\w+ = logging\.getLogger\(", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if made_plain.search(p.read_text())]
    assert offenders == []
