"""Run directories that may be remote: `--workdir gs://bucket/run` as well as a local path.

    workdir = as_path("gs://bucket/run")       # or "runs/x", made absolute
    (workdir / "result.json").write_text(...)

Everything that reads or writes a run directory (the trainer, its checkpointer and metric
writer, `config.json` and `result.json`, sweeps and reports) takes it through `as_path`, an
`etils.epath.Path`: the pathlib API, with `gs://`, `s3://`, `az://` and `hf://` URIs handled
by their file systems (`gs://` needs `gcsfs`, or TensorFlow, installed: `pip install -e
'.[gcs]'`; Orbax writes checkpoint arrays through TensorStore, which reads `gs://` itself).
A local path is made absolute (`pathlib.Path.absolute()`, as before); a URI is kept as given
(`pathlib.Path("gs://b/run")` would be `gs:/b/run`, a local directory named `gs:`).

A remote file cannot be appended to, so writers that append locally rewrite the whole file
there (`memjax.train.metrics.MetricWriter`).
"""

import os
import pathlib
import re

from etils import epath

_URI = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*)://")
# The URI schemes etils.epath has file systems for.
REMOTE_SCHEMES = ("gs", "s3", "az", "hf")


def scheme(path) -> str | None:
    """The URI scheme of `path` (`"gs"` for `gs://bucket/run`), or None for a local path."""
    match = _URI.match(os.fspath(path))
    return match.group(1) if match else None


def is_remote(path) -> bool:
    """True for a URI such as `gs://bucket/run`, False for a local path."""
    return scheme(path) is not None


def as_path(path) -> epath.Path:
    """`path` (str, pathlib or epath path) as an `epath.Path`: a URI as given, a local path
    made absolute. Raises ValueError for a URI scheme epath has no file system for."""
    text = os.fspath(path)
    uri = scheme(text)
    if uri is None:
        return epath.Path(pathlib.Path(text).absolute())
    if uri not in REMOTE_SCHEMES:
        raise ValueError(f"{text}: {uri}:// paths are not supported; use a local path or one of "
                         + ", ".join(f"{s}://" for s in REMOTE_SCHEMES))
    return epath.Path(text)
