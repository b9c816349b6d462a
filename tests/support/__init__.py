"""Helpers shared by the tests (not tests themselves).

- :mod:`support.cli`: run the ``captioning`` command line in subprocesses, the ``Probe``
  callback and the test datamodules those subprocesses import by class path;
- :mod:`support.photos`: generated photos, COCO/Karpathy/CSV annotation files;
- :mod:`support.recurrence`: fused-recurrence-equals-plain-loop checks for the decoders;
- :mod:`support.host_sync`: fail a block of code that makes the CPU wait for the GPU.

``tests/`` is on ``sys.path`` (pytest puts the folder of ``conftest.py`` there, and
:func:`support.cli.cli_env` puts it on a subprocess's ``PYTHONPATH``), so tests import these
as ``support.<module>``.
"""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent  # the repository
