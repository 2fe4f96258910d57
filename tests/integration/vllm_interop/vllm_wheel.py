"""Import vLLM's own KV-event and block-hashing code straight from its PyPI wheel.

vLLM cannot be installed on this machine's CPU-only Python (its wheel is CUDA-built
and pulls torch/transformers), but the two files kvxfer must agree with are plain
Python: ``vllm/distributed/kv_events.py`` (the publisher and event types) and
``vllm/v1/core/kv_cache_utils.py`` (the block hashing). They are imported from the
wheel as they are, with the few modules they need that are themselves light
(``vllm/utils/hashing.py``, ``vllm/utils/math_utils.py``, ``vllm/config/kv_events.py``).
Every other ``vllm.*`` import is a trivial stub:

- ``vllm.logger.init_logger`` -> ``logging.getLogger``
- ``vllm.envs`` -> the environment with vLLM's defaults for the two names used
- ``vllm.config.utils.config`` -> ``dataclasses.dataclass`` (vLLM's pydantic wrapper)
- anything else (type-only imports: VllmConfig, KVCacheSpec, Request, ...) -> a module
  whose attributes are empty placeholder classes, never called on the hashing or
  publishing path.

``get_mm_features_in_window`` (``vllm/multimodal/utils.py``, which imports PIL) and,
in 0.34, ``token_slice`` (``vllm/v1/token_buffer.py``) are taken from the wheel's
source by their syntax trees, so they too are vLLM's own code.

Run in a process of its own (the stubs fill ``sys.modules``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import types
import zipfile

#: Modules imported from the wheel as they are.
REAL = ("vllm/distributed/kv_events.py", "vllm/v1/core/kv_cache_utils.py",
        "vllm/utils/hashing.py", "vllm/utils/math_utils.py", "vllm/config/kv_events.py")
#: Light functions of heavy modules, taken from the wheel's source by syntax tree
#: (with the module's standard-library imports): module -> (file, names).
FUNCTIONS = {
    "vllm.multimodal.utils": ("vllm/multimodal/utils.py", ("get_mm_features_in_window",)),
    "vllm.v1.token_buffer": ("vllm/v1/token_buffer.py", ("token_slice",)),  # 0.34
}


def wheel_version(wheel: str) -> str:
    """'0.33.0' of 'vllm-0.33.0-cp38-abi3-....whl'."""
    return re.match(r"vllm(?:_cpu)?-([0-9][^-]*)-", os.path.basename(wheel)).group(1)


def extract(wheel: str, dest: str) -> str:
    """Unpack the files above from ``wheel`` under ``dest``; returns ``dest``."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in (*REAL, *(f for f, _ in FUNCTIONS.values())):
            if name in names:
                zf.extract(name, dest)
    return dest


class _Placeholders(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self.__name__ == "vllm" and name == "envs":  # `from vllm import envs`
            return importlib.import_module("vllm.envs")
        value = type(name, (), {})
        setattr(self, name, value)
        return value


class _Envs(types.ModuleType):
    def __getattr__(self, name: str):
        if name == "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES":  # vLLM's default: "1"
            return bool(int(os.getenv(name, "1")))
        if name == "VLLM_HOST_IP":
            return os.getenv(name, "")
        raise AttributeError(f"vllm.envs.{name} is not stubbed")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name != "vllm" and not name.startswith("vllm."):
            return None
        rel = name.replace(".", "/")
        real = os.path.join(self.root, rel + ".py")
        if rel + ".py" in REAL and os.path.exists(real):
            return importlib.util.spec_from_file_location(name, real)
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        if spec.name == "vllm.envs":
            return _Envs(spec.name)
        return _Placeholders(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []
        if module.__name__ == "vllm.logger":
            module.init_logger = logging.getLogger
        elif module.__name__ == "vllm.config.utils":
            module.config = dataclasses.dataclass
        elif module.__name__ in FUNCTIONS:
            self._real_functions(module, *FUNCTIONS[module.__name__])

    def _real_functions(self, module, rel: str, names: tuple[str, ...]) -> None:
        path = os.path.join(self.root, rel)
        if not os.path.exists(path):
            return
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        def stdlib(node: ast.AST) -> bool:
            if isinstance(node, ast.Import):
                return all(a.name.split(".")[0] in sys.stdlib_module_names for a in node.names)
            return isinstance(node, ast.ImportFrom) and node.level == 0 and \
                node.module.split(".")[0] in sys.stdlib_module_names

        body = [node for node in tree.body if stdlib(node) or
                (isinstance(node, ast.FunctionDef) and node.name in names)]
        code = compile(ast.Module(body=body, type_ignores=[]), path, "exec")
        namespace = {"__name__": module.__name__}
        exec(code, namespace)  # noqa: S102 - vLLM's own function, from its wheel
        for name in names:
            if name in namespace:
                setattr(module, name, namespace[name])


def load(wheel: str, dest: str) -> types.SimpleNamespace:
    """Import vLLM's kv_events and kv_cache_utils from ``wheel`` (unpacked in ``dest``).

    Returns:
        ``version``, ``kv_events``, ``kv_cache_utils``, ``hashing`` modules.
    """
    extract(wheel, dest)
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _Finder(dest))
    import vllm.distributed.kv_events as kv_events
    import vllm.utils.hashing as hashing
    import vllm.v1.core.kv_cache_utils as kv_cache_utils
    for module in (kv_events, kv_cache_utils, hashing):
        assert module.__file__.startswith(dest), module.__file__
    return types.SimpleNamespace(version=wheel_version(wheel), kv_events=kv_events,
                                 kv_cache_utils=kv_cache_utils, hashing=hashing)
