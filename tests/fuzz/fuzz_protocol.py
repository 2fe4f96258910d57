"""Coverage-guided fuzzing (atheris) of frame decoding, the HELLO/AUTH path, metadata and
notes: every input goes through every target in tests/fuzz/targets.py.

    python tests/fuzz/fuzz_protocol.py -atheris_runs=1000000

Prints atheris's progress; exits non-zero on the first crash (and writes the input to
crash-*). ``-seed=N`` makes a run repeatable. Seeded with valid frames of each type.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["kvxfer"]):
    import targets


def main() -> None:
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus given: the seeds
        corpus = tempfile.mkdtemp(prefix="kvxfer-fuzz-")
        for i, seed in enumerate(targets.seeds()):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
    atheris.Setup(argv, lambda data: targets.every(bytes(data)))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
