"""Benchmark and scaling suite behind ``himnet-fast bench`` and ``himnet-fast scale``.

:mod:`.runner` plans and runs jobs, each in its own process (:mod:`.worker`);
:mod:`.providers` defines what is measured; :mod:`.steps` prepares a job's checked, timeable
steps (shared with the pytest-benchmark suites in ``bench/``); :mod:`.metrics` how (time, peak
memory, environment); :mod:`.report` writes the markdown table and plots; :mod:`.schema` the CSV row;
:mod:`.kernel_count` predicts on CPU the CUDA kernels a step launches (``bench --count-kernels``).
Heavy dependencies (pandas, matplotlib) are imported only when a run starts.
"""
