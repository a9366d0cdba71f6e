"""The library the pipeline's stages use: pure logic and the field's libraries, wired by `stages/`.

Calls go one way: `flows/` runs `dvc repro`, DVC runs the `stages/` entry points, and they import from here. Nothing
here imports `stages/` or `flows/`, and the subpackages (one per concern) do not import each other; all of them may
use `dapt.common`, `dapt.tracking` and `dapt.registry` (the contracts in pyproject.toml's `[tool.importlinter]`,
checked by `make test`).
"""
