"""Tools around the library: the command line and what its commands run.

``python -m fastbn`` (:mod:`fastbn.tools.cli`) dispatches to the modules here:

=================  ==============================================================
module             what it is
=================  ==============================================================
``cli``            the argparse command line; ``demo`` and ``startup``
``bench``          ``python -m fastbn bench``: the runs behind the CPU report
``cases``          what the benchmarks time: shapes, inputs, the implementations
                   compared (shared with the pytest-benchmark suites in bench/),
                   the roofline's pass counts, the timer and the oracle check
``report``         the benchmark's Markdown report, README snippet, JSON, charts
``bench_fused``    ``python -m fastbn bench-fused``: fused forms against separate
                   calls
``ptx``            ``python -m fastbn ptx``: every CUDA kernel through NVVM and
                   ptxas, no GPU needed
``cuda12``         CUDA 12's compiler for the compute capabilities CUDA 13
                   dropped, run as a child process of ``ptx``
``nvvm``           what ``ptx`` and ``cuda12`` share: compiling the kernel table
                   with this process's NVVM and reading ptxas's report
``plan``           ``python -m fastbn plan``: the CPU plan for a given input
=================  ==============================================================

The library never imports this package: ``import fastbn`` and every call of
its functions leave ``fastbn.tools`` unimported, and nothing here is needed
to use batch norm.  The dependencies run one way, from here into the library.
"""
