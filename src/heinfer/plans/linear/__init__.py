"""Linear models on BFV: the compiler, the server plan, the client codec and two layouts."""

from heinfer.plans.linear.batch import BATCH_LAYOUT_KIND, BatchClient, BatchServer
from heinfer.plans.linear.codec import LinearCodec
from heinfer.plans.linear.compile import FLOODING_BITS, NoiseBudget, compile_linear
from heinfer.plans.linear.plan import LinearPlan, Treatment
from heinfer.plans.linear.rowpack import LAYOUT_KIND, RowpackClient, RowpackServer

__all__ = [
    "BATCH_LAYOUT_KIND",
    "FLOODING_BITS",
    "LAYOUT_KIND",
    "BatchClient",
    "BatchServer",
    "LinearCodec",
    "LinearPlan",
    "NoiseBudget",
    "RowpackClient",
    "RowpackServer",
    "Treatment",
    "compile_linear",
]
