"""Experiments on GradMem, apart from the algorithm (``gradmem``) and the jobs users submit (``jobs/``).

Each runnable module's docstring gives its command, run from the repository root::

    python -m benchmarks.capacity --config benchmarks/configs/capacity_cpu.yaml   # memory capacity grid (key-value)
    python -m benchmarks.compare --config benchmarks/configs/babi_qa1_cpu.yaml    # methods on bAbI / SQuAD
    python -m benchmarks.gpu_check                                                # the paper's N = 16 cell on a GPU
    python -m benchmarks.core                                                     # core speed vs a naive version
    python -m benchmarks.gpu_bench --output runs/gpu_bench                        # GPU speed and MFU
    python -m benchmarks.train                                                    # distributed training throughput
    python -m benchmarks.compress                                                 # batch compression throughput
    python -m benchmarks.loadtest_serve                                           # load test of the query service

``common`` holds what they share; ``sweep`` the learning-rate sweep of the two grids; ``configs/`` their YAML.
Results and the commands that produced them: docs/results/. Nothing outside tests imports this package.
"""
