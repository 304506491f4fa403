"""The pieces of ``benchmarks/run_benchmark.py``, one job per module:

- ``cases``: the benchmark cases (phantoms made once, a real scan) as one-scan BIDS datasets;
- ``probe``: the profiler (exclusive time and peak RSS per phase, by wrapping the pipeline's
  functions) and the network forward timer;
- ``workers``: one run of a case in a fresh process, ours or the reference's;
- ``agreement``: Dice per label and per matched instance, against the reference and the
  phantom truth;
- ``report``: medians over the runs, the machine, the table and the markdown summary.

Every module imports only the standard library at import time (``reference_worker.py``
imports ``probe`` inside the reference's own virtual environment).
"""
