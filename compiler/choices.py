"""Names the command line offers whose meaning lives in the heavy layers (the IR's weight formats,
the lowering's phases), kept here without torch so that `ffc --help` and a mistyped argument
answer at once (importing the IR for two tuples took over a second)."""

# --quant / --self-draft: "none", "gguf" (each weight as its file stores it), then the formats
# ir/quant.py's QUANT_CHOICES maps (tests/test_cli.py checks they agree)
QUANT_MODES = ("none", "gguf", "q4_0", "q4_1", "q8_0", "int4-g32", "int4-g64", "int8")
# lowering phases, in order (--dump-after lower.PHASE)
PHASES = ("fusion", "partition", "specs", "memory")
