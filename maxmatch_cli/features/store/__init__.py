"""HDF5 feature store, schema v1: the one file that ``train`` and ``evaluate`` read.

Every source (synthetic demo data, SCAN precomp folders, bottom-up-attention TSV files, torchvision extraction
from images) becomes the same kind of file: features as float16, one HDF5 chunk per image, plus captions and
splits. The package is cut along what a caller does with such a file:

* :mod:`~.schema`: the format (documented there), its constants and the checks a file must pass on opening.
* :mod:`~.reader`: :func:`open_store` validates a file and returns a :class:`FeatureStore`, which opens its
  HDF5 handle lazily in each process, so it can be handed to DataLoader workers.
* :mod:`~.writer`: :class:`StoreWriter` appends images, captions and splits, atomically and resumably; its
  arguments are checked and its ``.partial`` created or resumed in :mod:`~.opening`, the ``<path>.partial`` file
  it fills is handled in :mod:`~.partial`, a batch is appended in :mod:`~.appending` (its checks and float16
  encoding in :mod:`~.batch` and :mod:`~.float16`), the room a write needs on the disk is reckoned in
  :mod:`~.room`, captions and splits are written in :mod:`~.splits`.
* :mod:`~.state`: :func:`store_state` (a finished store, a partial one or nothing at a path) and
  :func:`describe_store`; :mod:`~.describe` builds the summary, :mod:`~.fingerprint` the identities of the
  arguments (:func:`args_fingerprint`) and of the contents (``FeatureStore.fingerprint``).

Writing and resuming
--------------------
:class:`StoreWriter` writes ``<path>.partial`` and renames it to ``<path>`` only after ``complete`` is set and
the file is closed and synced, so a file at ``<path>`` is always complete and a crashed run leaves only a
``.partial``. Images are appended in order; ``n_written`` is updated at each flush. Re-running with
``resume=True`` and the same ``args_fingerprint`` continues after the last flushed image; a different
fingerprint is refused with a message. :func:`store_state` tells an importer whether there is nothing, a
partial file or a finished file at a path, so that re-running a finished extraction does nothing.
"""

from maxmatch_cli.features.store.fingerprint import args_fingerprint
from maxmatch_cli.features.store.reader import FeatureStore, open_store
from maxmatch_cli.features.store.schema import (
    FEATURE_KINDS,
    LAYOUTS,
    PARTIAL_SUFFIX,
    PIXELS,
    SCHEMA_VERSION,
    partial_path,
)
from maxmatch_cli.features.store.state import describe_store, store_state
from maxmatch_cli.features.store.writer import StoreWriter

__all__ = [
    "FEATURE_KINDS",
    "LAYOUTS",
    "PARTIAL_SUFFIX",
    "PIXELS",
    "SCHEMA_VERSION",
    "FeatureStore",
    "StoreWriter",
    "args_fingerprint",
    "describe_store",
    "open_store",
    "partial_path",
    "store_state",
]
