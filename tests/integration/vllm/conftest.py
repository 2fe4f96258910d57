"""The vLLM tests run only where vLLM is installed (``make test-vllm``); ``make test``
collects nothing here and never imports vLLM."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
