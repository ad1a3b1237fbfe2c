"""What each target's kernels need from the plan beyond the IR, as data the spec builders read
(instead of ``if target == ...`` branches in them)."""
from __future__ import annotations

from dataclasses import dataclass

from ffc.ir.types import KV_DTYPES, DType
from ffc.plan.schema import Target

PANEL_ROWS = 48       # CPU linear weights are packed in panels of this many rows (FFC_NR in csrc/ffc_cpu.h)
QPANEL_ROWS = 16      # quantized ones in panels of this many rows (FFC_QR in csrc/ffc_quant.h)


@dataclass(frozen=True)
class TargetPolicy:
    target: Target
    # linear weights repacked when the plan is bound, into panels of this many rows (each k
    # step of the register-tiled kernel reads them contiguously); 0: read as stored
    panel_rows: int = 0
    qpanel_rows: int = 0      # the same for quantized weights (rows of blocks); 0: rows of blocks as stored
    kv_dtypes: tuple = (DType.F32,)    # KV-cache storage types its attention kernels read


POLICIES = {Target.CPU: TargetPolicy(Target.CPU, panel_rows=PANEL_ROWS, qpanel_rows=QPANEL_ROWS, kv_dtypes=KV_DTYPES),
            Target.CUDA: TargetPolicy(Target.CUDA, kv_dtypes=KV_DTYPES)}
