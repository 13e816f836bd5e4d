"""mugbench: a like-for-like benchmark of self-supervised vision pre-training on web image-text pairs.

The Python API (README, "Python API"): `run` (a study, as `mugbench run`), `load_results` (result records
as a pandas DataFrame) and `build_method` (a registered method around the study's encoder). They are
imported on first use, so that ``import mugbench`` and the command line stay quick.
"""

__version__ = "0.1.0"

_API = ("run", "load_results", "build_method")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mugbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
