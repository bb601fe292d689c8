"""The RMSprop document's demonstrations, every optimizer step an HTTP call to optserve.

Each demo is a function ``demo(url) -> DemoResult`` holding one record per iteration, so
tests assert on data; `print_result` prints the document's tables from those records and
`plot_result` draws them. Statements printed after a table are computed from the records
(measured), never canned: where the document's claim does not hold as stated, the numbers
say so.

Iteration ``i`` counts as in the document: the record for ``i`` holds the values after the
(i+1)-th update, so "iteration 100" of a 100-iteration run is ``i = 99``.

The package: `experiments` and `centered` (the demos), `result` (their data), `report`
(tables), `plots` (figures), `cli` (`optserve demo`). It uses only the SDK, never the server,
except to start a local service when no ``--url`` is given.
"""

from .centered import centered
from .cli import DEMOS, main, run
from .experiments import ill_conditioned, quadratic, vs_adagrad
from .plots import DOUBLE_SIZE, DPI, SINGLE_SIZE, plot_result
from .report import print_result
from .result import Column, DemoResult, Record

__all__ = [
    "DEMOS",
    "DOUBLE_SIZE",
    "DPI",
    "SINGLE_SIZE",
    "Column",
    "DemoResult",
    "Record",
    "centered",
    "ill_conditioned",
    "main",
    "plot_result",
    "print_result",
    "quadratic",
    "run",
    "vs_adagrad",
]
