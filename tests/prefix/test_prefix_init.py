"""kvxfer.prefix stays light: no zmq, msgspec or xxhash until they are used."""

from __future__ import annotations

import subprocess
import sys

import kvxfer.prefix


def test_import_does_not_load_event_or_hash_libraries():
    code = ("import sys, kvxfer, kvxfer.prefix;"
            "print(sorted(m for m in ('zmq', 'msgspec', 'xxhash') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]"


def test_lazy_names_resolve():
    from kvxfer.prefix.subscriber import KVEventSubscriber
    assert kvxfer.prefix.KVEventSubscriber is KVEventSubscriber
    assert set(kvxfer.prefix.__all__) <= set(dir(kvxfer.prefix)) | set(kvxfer.prefix._LAZY)
    try:
        kvxfer.prefix.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
