"""The plan: what lowering (``ffc.lower``) writes and the runtime reads.

    schema    the frozen Plan: per graph its steps, buffers and arena; the unique kernels
    kernels   kernel families, the spec type of each, and the cost family each is priced by
    expr      the expression tree that specs carry instead of C text
    codec     JSON in and out for these frozen types, checked field by field

This package holds data types only: importing it pulls in neither the lowering nor codegen,
so the runtime depends on the plan's form and not on how it was made.
"""
